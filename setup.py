from setuptools import find_packages, setup

setup(
    name="longformer",
    version="0.1.0",
    description="A from-scratch, pure-PyTorch Longformer that loads HF/RoBERTa checkpoints and matches HF transformers",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["longformer", "longformer.*"]),
    package_data={"longformer": ["recipes/*.json"]},
    python_requires=">=3.11",
    install_requires=["torch>=2.7", "numpy", "tokenizers>=0.15", "safetensors>=0.4", "tqdm"],
    extras_require={"test": ["transformers>=4.44", "pytest", "matplotlib", "pyarrow", "tensorboard"],
                    "plot": ["matplotlib"], "export": ["onnx", "onnxscript", "onnxruntime"],
                    "hub": ["huggingface_hub>=0.24"], "parquet": ["pyarrow"], "tensorboard": ["tensorboard"]},
)

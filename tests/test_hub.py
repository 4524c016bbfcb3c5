"""Hub names: a tiny checkpoint laid out in a temporary Hugging Face cache as huggingface_hub lays it out, loaded
by name with no network (HF_HUB_OFFLINE=1, or local_files_only=True), by the model, the tokenizer, convert and
export, and by HF transformers, which must agree; and the clear message for each way a name can fail."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer

import longformer
from conftest import save_hf
from longformer import hub

huggingface_hub = pytest.importorskip("huggingface_hub", reason='Hub names need huggingface_hub: pip install '
                                                               '"longformer[hub]"')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "org/tiny-longformer"
TEXT = "The quick brown fox jumps over the lazy dog, and documents are long."


def lay_out(cache, repo_id: str, folder, revision: str = "main") -> str:
    """folder's files in a Hub cache, as huggingface_hub writes them: blobs/<content hash>, snapshots/<commit>/<file>
    links to the blobs, refs/<revision> holding the commit. Returns the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for d in (repo / "blobs", repo / "refs", snapshot):
        d.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A masked-LM checkpoint with its tokenizer (folder "main"), a second one with other weights ("v2"), and a cache
    holding both under NAME, main and v2."""
    root = tmp_path_factory.mktemp("hub")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([TEXT] * 20, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    for seed, name in ((0, "main"), (1, "v2")):
        save_hf("LongformerForMaskedLM", root / name, seed=seed, vocab_size=300)
        tok.save_model(str(root / name))
        lay_out(root / "cache", NAME, root / name, revision=name)
    return root


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(checkpoint):
    repos = {r.repo_id: r for r in huggingface_hub.scan_cache_dir(checkpoint / "cache").repos}
    revisions = repos[NAME].revisions
    assert {ref for r in revisions for ref in r.refs} == {"main", "v2"}
    assert all({f.file_name for f in r.files} == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
               for r in revisions)


def test_model_and_tokenizer_by_name_equal_the_folder_and_hf(checkpoint):
    hub_args = dict(cache_dir=str(checkpoint / "cache"), local_files_only=True)
    by_name = longformer.LongformerForMaskedLM.from_pretrained(NAME, **hub_args).eval()
    by_folder = longformer.LongformerForMaskedLM.from_pretrained(str(checkpoint / "main")).eval()
    tok = longformer.load_tokenizer(NAME, **hub_args)
    assert tok.encode(TEXT).ids == longformer.load_tokenizer(str(checkpoint / "main")).encode(TEXT).ids
    ids = torch.tensor([tok.encode(TEXT).ids])
    torch.testing.assert_close(by_name(ids).logits, by_folder(ids).logits, atol=0, rtol=0)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LongformerForMaskedLM.from_pretrained(NAME, **hub_args).eval()
    torch.testing.assert_close(by_name(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    v2 = longformer.LongformerForMaskedLM.from_pretrained(NAME, revision="v2", **hub_args).eval()
    assert not torch.allclose(v2(ids).logits, by_name(ids).logits)  # another revision, other weights
    torch.testing.assert_close(
        v2(ids).logits, longformer.LongformerForMaskedLM.from_pretrained(str(checkpoint / "v2")).eval()(ids).logits)


def test_offline_environment_by_name_for_the_library_convert_and_export(checkpoint, tmp_path):
    """HF_HOME (the cache at $HF_HOME/hub) and HF_HUB_OFFLINE=1, as a user sets them; no argument names the cache."""
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(checkpoint / "cache", home / "hub")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    env.pop("HF_HUB_CACHE", None)
    script = f"""
import torch, longformer, transformers
ours = longformer.LongformerForMaskedLM.from_pretrained({NAME!r}).eval()
folder = longformer.LongformerForMaskedLM.from_pretrained({str(checkpoint / "main")!r}).eval()
hf = transformers.LongformerForMaskedLM.from_pretrained({NAME!r}).eval()
ids = torch.tensor([longformer.load_tokenizer({NAME!r}).encode({TEXT!r}).ids])
print((ours(ids).logits - folder(ids).logits).abs().max().item(), (ours(ids).logits - hf(ids).logits).abs().max().item())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    to_folder, to_hf = map(float, done.stdout.split()[-2:])
    assert to_folder == 0 and to_hf <= 1e-5

    convert = [sys.executable, "-m", "longformer.convert", NAME, str(tmp_path / "longer"), "--max-positions", "160"]
    done = subprocess.run(convert, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "longer" / "config.json").read_text())["max_position_embeddings"] == 162
    assert (tmp_path / "longer" / "vocab.json").exists()  # the tokenizer came along from the snapshot

    pytest.importorskip("onnxruntime")
    export = [sys.executable, "-m", "longformer.export", NAME, str(tmp_path / "m.onnx")]
    done = subprocess.run(export, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["checked_max_abs_diff"] <= 1e-4


def test_a_local_folder_wins_over_the_hub_name(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_hf("LongformerForMaskedLM", tmp_path / NAME, seed=1, vocab_size=300)  # ./org/tiny-longformer: v2's weights
    ids = torch.tensor([[0, 40, 41, 42, 2]])
    here = longformer.LongformerForMaskedLM.from_pretrained(NAME, cache_dir=str(checkpoint / "cache")).eval()
    v2 = longformer.LongformerForMaskedLM.from_pretrained(str(checkpoint / "v2")).eval()
    torch.testing.assert_close(here(ids).logits, v2(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name,revision,message", [
    (NAME, "v3", "revision 'v3' of org/tiny-longformer is not in the Hugging Face cache .*, and downloads are off "
                 "\\(local_files_only=True\\)"),
    ("org/elsewhere", None, "'org/elsewhere' is not a folder, and org/elsewhere is not in the Hugging Face cache"),
    ("path/to/my/model", None, "'path/to/my/model' is not a folder \\(no such directory\\), nor a Hub name"),
])
def test_names_that_resolve_to_nothing_say_what_was_tried(checkpoint, name, revision, message):
    for load in (longformer.LongformerModel.from_pretrained, longformer.load_tokenizer):
        with pytest.raises(FileNotFoundError, match=message):
            load(name, revision=revision, cache_dir=str(checkpoint / "cache"), local_files_only=True)


def test_without_the_extra_a_name_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as where it is not installed
    with pytest.raises(FileNotFoundError, match='not a folder, and reading Hub names needs huggingface_hub, which is '
                                                'not installed: pip install "longformer\\[hub\\]"'):
        longformer.LongformerModel.from_pretrained(NAME)
    save_hf("LongformerModel", tmp_path / "folder")
    longformer.LongformerModel.from_pretrained(str(tmp_path / "folder"))  # a folder needs nothing new


def test_only_the_files_the_job_needs_are_fetched(monkeypatch, tmp_path):
    """A repository with safetensors, .bin and TF weights: config.json and model.safetensors are fetched, nothing
    else; one with only sharded .bin weights: its index and shards."""
    from huggingface_hub import errors
    requested = []

    def serve(files):
        def hf_hub_download(repo_id, filename, **kwargs):
            requested.append(filename)
            if filename not in files:
                raise errors.EntryNotFoundError(f"{filename} not in {repo_id}")
            path = tmp_path / repo_id / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[filename])
            return str(path)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)

    serve({"config.json": "{}", "model.safetensors": "", "pytorch_model.bin": "", "tf_model.h5": ""})
    assert hub.resolve("a/full", "model") == str(tmp_path / "a" / "full")
    assert requested == ["config.json", "model.safetensors"]
    requested.clear()
    index = json.dumps({"weight_map": {"x": "pytorch_model-1.bin", "y": "pytorch_model-2.bin"}})
    serve({"config.json": "{}", "pytorch_model.bin.index.json": index, "pytorch_model-1.bin": "",
           "pytorch_model-2.bin": "", "vocab.json": "", "merges.txt": ""})
    hub.resolve("a/sharded", "model")
    assert requested == ["config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                         "pytorch_model.bin.index.json", "pytorch_model-1.bin", "pytorch_model-2.bin"]
    requested.clear()
    hub.resolve("a/sharded", "tokenizer")
    assert requested == ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                         "special_tokens_map.json"]
    with pytest.raises(FileNotFoundError, match="a/none on the Hub holds no model.safetensors or "):
        serve({"config.json": "{}"})
        hub.resolve("a/none", "model")


@pytest.mark.parametrize("command", [
    ["-m", "longformer.export", "no/such/folder", "out.onnx"],
    ["-m", "longformer.convert", "no/such/folder", "out"],
    [os.path.join(ROOT, "train_mlm.py"), "--init", "no/such/folder", "--data", "no/such/data"],
    [os.path.join(ROOT, "train_cls.py"), "--init", "no/such/folder", "--data", "no/such/data"],
])
def test_a_missing_checkpoint_is_one_line_with_exit_status_2(command, tmp_path):
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")

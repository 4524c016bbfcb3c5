"""Hub names where a checkpoint folder is taken: "allenai/longformer-base-4096" as every HF user types it.

A name that is an existing folder is that folder: it always wins over a Hub name of the same spelling. Anything
else goes to huggingface_hub (an optional extra: pip install "longformer[hub]"), which looks in its cache
(HF_HOME, HF_HUB_CACHE, or cache_dir=) and, unless offline (HF_HUB_OFFLINE=1 or local_files_only=True), on the
Hub. Only the files the job needs are fetched, one at a time: config.json, the first weights file the
repository has (safetensors before the .bin, shards through their index), the tokenizer's files. They land
in one snapshot folder of the cache, which is returned.
"""
import json
import os

# What each job reads: groups of alternatives; the first alternative whose files all exist is taken.
WEIGHTS = (("model.safetensors",), ("model.safetensors.index.json",), ("pytorch_model.bin",),
           ("pytorch_model.bin.index.json",))
TOKENIZER = (("tokenizer.json",), ("vocab.json", "merges.txt"))
OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json")
FILES = {"config": [(("config.json",),)], "model": [(("config.json",),), WEIGHTS], "tokenizer": [TOKENIZER]}


def resolve(name: str, files: str = "model", revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False, token: str | bool | None = None) -> str:
    """The local folder holding `files` ("config", "model" or "tokenizer") of name: name itself where it is a
    folder, else the Hub snapshot holding them, fetched as needed. A clear FileNotFoundError otherwise."""
    if os.path.isdir(name):
        return name
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise FileNotFoundError(f"{name!r} is not a folder, and reading Hub names needs huggingface_hub, which is "
                                f"not installed: pip install \"longformer[hub]\" (or give the path of a checkpoint "
                                f"folder)") from None

    def fetch(filename):
        return huggingface_hub.hf_hub_download(name, filename, revision=revision, cache_dir=cache_dir,
                                               local_files_only=local_files_only, token=token)

    where = name if revision is None else f"revision {revision!r} of {name}"
    try:
        folder = None
        for alternatives in FILES[files]:
            folder = _first_present(fetch, alternatives, where)
        if files == "tokenizer":
            for optional in OPTIONAL:
                _first_present(fetch, ((optional,),), where, required=False)
        return folder
    except errors.HFValidationError:
        raise FileNotFoundError(f"{name!r} is not a folder (no such directory), nor a Hub name (org/name): check "
                                f"the path") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{name!r} is not a folder, and its Hub repository has no revision {revision!r}: "
                                f"give a branch, tag or commit that exists") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{name!r} is not a folder, nor a repository on the Hub (if it is private or gated, "
                                f"log in with `hf auth login` or pass token=)") from None
    except errors.LocalEntryNotFoundError:
        cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        missing = f"{name!r} is not a folder, and {where} is not in the Hugging Face cache ({cache})"
        if huggingface_hub.constants.HF_HUB_OFFLINE or local_files_only:
            flag = "HF_HUB_OFFLINE=1" if huggingface_hub.constants.HF_HUB_OFFLINE else "local_files_only=True"
            raise FileNotFoundError(f"{missing}, and downloads are off ({flag}): download it once online, or point "
                                    f"HF_HUB_CACHE (or cache_dir=) at the cache that holds it") from None
        raise FileNotFoundError(f"{missing}, and the Hub could not be reached: check the connection, or point "
                                f"HF_HUB_CACHE (or cache_dir=) at a cache that holds it") from None


def _first_present(fetch, alternatives, where: str, required: bool = True) -> str | None:
    """Fetch the first alternative whose files all exist (an index.json's shards with it); its folder."""
    from huggingface_hub import errors
    not_cached = None
    for alternative in alternatives:
        try:
            paths = [fetch(f) for f in alternative]
        except errors.LocalEntryNotFoundError as e:  # offline: absent from the cache, maybe not from the Hub
            not_cached = not_cached or e
            continue
        except errors.EntryNotFoundError:  # the Hub says the repository has no such file
            continue
        if paths[0].endswith(".index.json"):
            with open(paths[0]) as f:
                for shard in sorted(set(json.load(f)["weight_map"].values())):
                    fetch(shard)
        return os.path.dirname(paths[0])
    if not required:
        return None
    if not_cached is not None:
        raise not_cached
    expected = " or ".join(" + ".join(a) for a in alternatives)
    raise FileNotFoundError(f"{where} on the Hub holds no {expected}")

"""`dspark verify-bundle`: is this bundle complete, untouched, loadable, and lossless?

Checks, in order (the first failure raises DsparkError naming the file, key or token):
1. schema: dspark-bundle.yaml parses against the strict manifest schema;
2. files: every listed file exists with its size and sha256, and no file is unlisted;
3. weight names: the draft's (and a local target's) safetensors hold exactly the tensors of the model
   built from its config.json (dspark.bundle.weights);
4. target identity: the target found here has the recorded revision / weight hash, and both
   tokenizers have the recorded fingerprints;
5. decode: one prompt decoded greedily by the pair (dspark's speculative decoder, the bundle's
   policy; cross-tokenizer when the draft has its own tokenizer) equals a plain greedy loop over the
   target alone, token for token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from dspark.bundle.manifest import DRAFT_DIR, MANIFEST_NAME, TARGET_DIR, BundleManifest, read_manifest
from dspark.bundle.weights import check_weight_keys
from dspark.errors import DsparkError
from dspark.io import sha256_file

DEFAULT_PROMPT = "def fibonacci(n):\n"
DEFAULT_MAX_NEW_TOKENS = 16
SHOWN = 4

Log = Callable[[str], None]


def _names(items: list[str]) -> str:
    head = ", ".join(items[:SHOWN])
    return head + (f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def check_files(bundle: str | os.PathLike, manifest: BundleManifest) -> int:
    """Compare the bundle's files with the manifest; DsparkError naming every missing, modified and
    unlisted file. Returns the number of files checked."""
    bundle = Path(bundle)
    missing, modified, links = [], [], []
    for rel, entry in manifest.files.items():
        p = bundle / rel
        if p.is_symlink():
            links.append(rel)
        elif not p.is_file():
            missing.append(rel)
        elif p.stat().st_size != entry.size or sha256_file(p) != entry.sha256:
            modified.append(rel)
    extra = []
    for dirpath, dirnames, filenames in os.walk(bundle):
        for fn in filenames:
            rel = (Path(dirpath) / fn).relative_to(bundle).as_posix()
            if rel != MANIFEST_NAME and rel not in manifest.files:
                extra.append(rel)
    problems = []
    if missing:
        problems.append(f"missing file(s) {_names(sorted(missing))}")
    if modified:
        problems.append(f"modified file(s) {_names(sorted(modified))} (sha256 differs from the manifest)")
    if links:
        problems.append(f"file(s) replaced by symlinks {_names(sorted(links))}")
    if extra:
        problems.append(f"file(s) not in the manifest {_names(sorted(extra))}")
    if problems:
        raise DsparkError(f"bundle {str(bundle)!r} failed its integrity check: {'; '.join(problems)}")
    return len(manifest.files)


def target_source(bundle: Path, manifest: BundleManifest) -> str:
    """What to load the target from: the bundled copy, the recorded local folder, or its name."""
    t = manifest.target
    if t.included:
        return str(bundle / TARGET_DIR)
    return t.resolves_to if t.kind == "local" else t.name


def check_target_identity(bundle: Path, manifest: BundleManifest, full_hash: bool = True) -> dict:
    """The target found here must be the one the bundle was made for (revision or weight hash).
    Returns what was checked. `full_hash=False` skips hashing the weights of a non-bundled target
    (a server start-up on a 70B target); the revision is still compared."""
    from dspark.distill.collect import safetensors_hash
    from dspark.models import resolve_model
    from dspark.models.loading import not_available_error

    t = manifest.target
    source = target_source(bundle, manifest)
    if t.included:
        folder = Path(source)
    else:
        r = resolve_model(source)
        if r.local_path is None:
            raise not_available_error(r)
        folder = r.local_path
    out = {"source": source, "folder": str(folder), "revision": None, "weight_sha256": None}
    if t.revision is not None:
        found = folder.name if folder.parent.name == "snapshots" else None
        if found != t.revision:
            raise DsparkError(f"target {t.name!r} here is at revision {found or 'unknown (not a hub snapshot)'}, "
                              f"the bundle was made with revision {t.revision}: download that revision "
                              "or re-export the bundle")
        out["revision"] = found
    if t.weight_sha256 is not None and (full_hash or t.included):
        found = safetensors_hash(folder)
        if found != t.weight_sha256:
            raise DsparkError(f"target {t.name!r} at {folder} has different weights than the bundle was made "
                              f"with (safetensors sha256 {found[:12]}... != {t.weight_sha256[:12]}...)")
        out["weight_sha256"] = found
    return out


def greedy_reference(model, prompt_ids: Sequence[int], max_new_tokens: int, vocab: int,
                     stop_ids: Sequence[int]) -> list[int]:
    """The target alone, greedy, one full forward per token (no cache, nothing shared with the
    speculative decoder). Argmax over the first `vocab` logits; a stop token ends it (included)."""
    import torch

    ids = list(prompt_ids)
    device = next(model.parameters()).device
    out: list[int] = []
    stops = set(int(s) for s in stop_ids)
    with torch.inference_mode():
        while len(out) < max_new_tokens:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1, :vocab]
            tok = int(logits.float().argmax())
            ids.append(tok)
            out.append(tok)
            if tok in stops:
                break
    return out


def load_pair(bundle: Path, manifest: BundleManifest, device: str = "cpu", dtype: str = "float32"):
    """(target LoadedModel, draft LoadedModel), checked: the recorded tokenizers, and the tokenizer
    relation the manifest records (a draft with its own tokenizer is decoded cross-tokenizer)."""
    from dspark.models import check_pair, load_model, tokenizer_hash

    target = load_model(target_source(bundle, manifest), device=device, dtype=dtype)
    draft = load_model(str(bundle / DRAFT_DIR), device=device, dtype=dtype)
    compat = check_pair(target, draft)
    recorded = manifest.draft.tokenizer
    if (compat.mode.value == "different") != (recorded == "different"):
        raise DsparkError(f"the bundle records draft tokenizer {recorded!r} but the pair found here is "
                          f"{compat.mode.value!r} ({compat.message})")
    for what, loaded, recorded in (("target", target, manifest.target.tokenizer_sha256),
                                   ("draft", draft, manifest.draft.tokenizer_sha256)):
        found = tokenizer_hash(loaded.tokenizer)
        if found != recorded:
            raise DsparkError(f"the {what} tokenizer differs from the one the bundle was made with "
                              f"(fingerprint {found[:12]}... != {recorded[:12]}...)")
    return target, draft


def verify_bundle(bundle: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32",
                  prompt: str = DEFAULT_PROMPT, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  log: Log | None = None) -> dict:
    """Run every check (module docstring); return a JSON-able report. Raises DsparkError on failure."""
    log = log or (lambda _msg: None)
    if max_new_tokens < 1:
        raise DsparkError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    bundle = Path(bundle).expanduser()
    log("reading the manifest")
    manifest = read_manifest(bundle)
    log(f"hashing {len(manifest.files)} files")
    n_files = check_files(bundle, manifest)
    log("checking weight names")
    keys = {"draft": check_weight_keys(bundle / DRAFT_DIR, "draft").to_dict()}
    identity = check_target_identity(bundle, manifest)
    keys["target"] = check_weight_keys(Path(identity["folder"]), "target").to_dict()

    log(f"loading the target ({identity['source']}) and the draft")
    target, draft = load_pair(bundle, manifest, device, dtype)
    from dspark.decode import GenerationConfig, make_decoder

    decoder = make_decoder(target.model, draft.model, target.tokenizer, manifest.policy.draft_length,
                           draft_tokenizer=draft.tokenizer)
    ids = target.tokenizer(prompt)["input_ids"]
    if not ids:
        raise DsparkError(f"prompt {prompt!r} encodes to no tokens")
    log(f"decoding {max_new_tokens} tokens with the pair and with the target alone")
    result = decoder.generate([ids], GenerationConfig(max_new_tokens=max_new_tokens))[0]
    reference = greedy_reference(target.model, ids, max_new_tokens, decoder.vocab, decoder.default_stop_ids)
    if result.token_ids != reference:
        at = next((i for i, (a, b) in enumerate(zip(result.token_ids, reference)) if a != b),
                  min(len(result.token_ids), len(reference)))
        raise DsparkError(f"the pair's greedy output differs from the target alone at generated token {at}: "
                          f"{result.token_ids[at:at + 4]} vs {reference[at:at + 4]} (the speculative decoder "
                          "or the bundle's models are broken)")
    st = result.stats
    return {
        "bundle": str(bundle), "name": manifest.name, "ok": True, "files_checked": n_files,
        "target": {"name": manifest.target.name, **identity, "weight_keys": keys["target"]},
        "draft": {"name": manifest.draft.name, "weight_keys": keys["draft"],
                  "acceptance_head": manifest.draft.acceptance_head},
        "decode": {"prompt": prompt, "tokens": result.token_ids, "text": target.tokenizer.decode(result.token_ids),
                   "equal_to_target": True, "draft_length": manifest.policy.draft_length,
                   "mode": getattr(decoder, "mode", "same-tokenizer"),
                   "drafted": st.drafted, "accepted": st.accepted, "acceptance_rate": st.acceptance_rate,
                   "mean_accepted_tokens": st.mean_accepted_tokens},
    }

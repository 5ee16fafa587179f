"""`dspark verify-bundle`: is this bundle complete, untouched, loadable, and lossless?

Checks, in order (the first failure raises DsparkError naming the file, key or token):
1. schema: dspark-bundle.yaml parses against the strict manifest schema (size and YAML alias
   expansion bounded);
2. files: every listed file exists with its size and sha256, no file is unlisted, and nothing in
   the bundle is a symlink (file or folder) or a special file: every file a load reads is inside
   the bundle and hashed;
3. weight names: the draft's (and the target's) safetensors hold exactly the tensors of the model
   built from its config.json, and the weight files an index or config names are inside the model
   folder (dspark.bundle.weights); the draft's weights match the manifest's `draft.weight_sha256`
   and `draft.weight_files`; draft/ holds no other safetensors an engine would load (schema 2: the
   acceptance head is in acceptance_head/; a schema 1 bundle's head inside draft/ is read from there);
4. target identity: the target found here has the recorded revision / weight hash, and both
   tokenizers have the recorded fingerprints;
5. decode: one prompt decoded greedily by the pair (dspark's speculative decoder, the bundle's
   policy; cross-tokenizer when the draft has its own tokenizer) equals a plain greedy loop over the
   target alone, token for token.

`open_bundle` (checks 1-4, then the load) is the one way dspark loads a bundle: `verify-bundle` adds
check 5, `serve-bundle` serves what it returns (`OpenBundle.decoder` builds the decoder both use,
with the acceptance head from where the manifest puts it).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dspark.bundle.manifest import DRAFT_DIR, MANIFEST_NAME, TARGET_DIR, BundleManifest, read_manifest
from dspark.bundle.weights import check_engine_folder, check_weight_keys, model_weight_files
from dspark.config.base import clip
from dspark.errors import DsparkError
from dspark.io import sha256_file

DEFAULT_PROMPT = "def fibonacci(n):\n"
DEFAULT_MAX_NEW_TOKENS = 16
SHOWN = 4

Log = Callable[[str], None]


def _names(items: list[str]) -> str:
    head = ", ".join(clip(i) for i in items[:SHOWN])
    return head + (f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def _uncontained(bundle: Path) -> tuple[list[str], list[str]]:
    """(symlinks, special files) anywhere under `bundle`, as 'rel -> target' / 'rel'. A symlinked
    folder is listed, not followed: what it holds is outside the bundle, whatever its hashes say."""
    links, special = [], []
    for dirpath, dirnames, filenames in os.walk(bundle):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(bundle).as_posix()
            if p.is_symlink():
                links.append(f"{rel}{'/' if name in dirnames else ''} -> {os.readlink(p)}")
            elif name in filenames and not stat.S_ISREG(p.lstat().st_mode):
                special.append(rel)
    return sorted(links), sorted(special)


def check_files(bundle: str | os.PathLike, manifest: BundleManifest) -> int:
    """Compare the bundle's files with the manifest; DsparkError naming every symlink and special
    file (refused before anything is hashed through them), then every missing, modified and
    unlisted file. Returns the number of files checked."""
    bundle = Path(bundle)
    links, special = _uncontained(bundle)
    if links or special:
        what = ([f"symlink(s) {_names(links)}"] if links else []) + \
               ([f"special file(s) {_names(special)}"] if special else [])
        raise DsparkError(f"bundle {str(bundle)!r} failed its integrity check: {'; '.join(what)} (a bundle "
                          "holds only regular files: what a link points to is not covered by its hashes)")
    missing, modified = [], []
    for rel, entry in manifest.files.items():
        p = bundle / rel
        if not p.is_file():
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
    if extra:
        problems.append(f"file(s) not in the manifest {_names(sorted(extra))}")
    if problems:
        raise DsparkError(f"bundle {str(bundle)!r} failed its integrity check: {'; '.join(problems)}")
    return len(manifest.files)


def check_draft_weights(bundle: Path, manifest: BundleManifest) -> None:
    """The draft's weight files and their fingerprint (`dspark.distill.collect.safetensors_hash`)
    are the ones the manifest records (`draft.weight_files`, `draft.weight_sha256`)."""
    from dspark.distill.collect import safetensors_hash

    folder = bundle / DRAFT_DIR
    files = [f.name for f in model_weight_files(folder)]
    if files != manifest.draft.weight_files:
        raise DsparkError(f"the draft loads from {_names(files)}, the manifest records "
                          f"{_names(manifest.draft.weight_files)}: the bundle was changed after export")
    found = safetensors_hash(folder)
    if found != manifest.draft.weight_sha256:
        raise DsparkError(f"the draft's weights in {str(folder)!r} are not the ones the manifest records "
                          f"(safetensors sha256 {found[:12]}... != draft.weight_sha256 "
                          f"{manifest.draft.weight_sha256[:12]}...): the bundle was changed after export")


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
            raise DsparkError(f"target {clip(t.name)!r} here is at revision {found or 'unknown (not a hub snapshot)'}, "
                              f"the bundle was made with revision {clip(t.revision)}: download that revision "
                              "or re-export the bundle")
        out["revision"] = found
    if t.weight_sha256 is not None and (full_hash or t.included):
        found = safetensors_hash(folder)
        if found != t.weight_sha256:
            raise DsparkError(f"target {clip(t.name)!r} at {folder} has different weights than the bundle was made "
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


def check_bundle(bundle: Path, manifest: BundleManifest, *, full_hash: bool = True, log: Log | None = None) -> dict:
    """Checks 2-4 of the module docstring except the tokenizers (they need the loaded models):
    files, weight names and files, the draft's fingerprint, the target's identity. Returns
    {"files_checked", "identity" (check_target_identity), "weight_keys" {"draft", "target"}}."""
    log = log or (lambda _msg: None)
    log(f"hashing {len(manifest.files)} files")
    n_files = check_files(bundle, manifest)
    log("checking weight names")
    keys = {"draft": check_weight_keys(bundle / DRAFT_DIR, "draft").to_dict()}
    if manifest.schema_version >= 2:
        check_engine_folder(bundle / DRAFT_DIR, f"the bundle's draft folder {str(bundle / DRAFT_DIR)!r}")
    check_draft_weights(bundle, manifest)
    identity = check_target_identity(bundle, manifest, full_hash)
    keys["target"] = check_weight_keys(Path(identity["folder"]), "target").to_dict()
    return {"files_checked": n_files, "identity": identity, "weight_keys": keys}


@dataclass
class OpenBundle:
    """A bundle that passed `check_bundle` and its tokenizer checks; target and draft are
    dspark.models.LoadedModel."""

    path: Path
    manifest: BundleManifest
    target: Any
    draft: Any
    checks: dict

    @property
    def head_folder(self) -> Path | None:
        """Where the acceptance head is (`BundleManifest.head_dir`), None without one."""
        return self.path / self.manifest.head_dir if self.manifest.head_dir else None

    def decoder(self, **kwargs):
        """The pair's decoder (`dspark.decode.make_decoder`) with the bundle's draft length and its
        acceptance head passed explicitly: it is not next to the draft's weights (the decoder's own
        fallback looks there), so a head left in draft/ by hand is never picked up."""
        from dspark.decode import make_decoder

        head = self.head_folder
        return make_decoder(self.target.model, self.draft.model, self.target.tokenizer,
                            self.manifest.policy.draft_length, draft_tokenizer=self.draft.tokenizer,
                            acceptance_head=str(head) if head else None, **kwargs)


def open_bundle(bundle: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32", full_hash: bool = True,
                log: Log | None = None) -> OpenBundle:
    """Read the manifest, run every check but the decode (`check_bundle`), and load the pair. The
    one way dspark loads a bundle: what verify-bundle verified is what serve-bundle serves.
    `full_hash=False` skips hashing a referenced (not bundled) target's weights, a server start on
    a 70B target; its revision is still compared."""
    log = log or (lambda _msg: None)
    bundle = Path(bundle).expanduser()
    log("reading the manifest")
    manifest = read_manifest(bundle)
    checks = check_bundle(bundle, manifest, full_hash=full_hash, log=log)
    log(f"loading the target ({checks['identity']['source']}) and the draft")
    target, draft = _load_pair(bundle, manifest, device, dtype)
    return OpenBundle(bundle, manifest, target, draft, checks)


def _load_pair(bundle: Path, manifest: BundleManifest, device: str, dtype: str):
    """(target LoadedModel, draft LoadedModel), checked: the recorded tokenizers, and the tokenizer
    relation the manifest records (a draft with its own tokenizer is decoded cross-tokenizer).
    Only after `check_bundle`: `open_bundle`."""
    from dspark.models import check_pair, load_model, tokenizer_hash
    from dspark.quantize.loading import load_draft

    target = load_model(target_source(bundle, manifest), device=device, dtype=dtype)
    draft = load_draft(str(bundle / DRAFT_DIR), device=device, dtype=dtype)
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
    opened = open_bundle(bundle, device=device, dtype=dtype, log=log)
    bundle, manifest, target, draft = opened.path, opened.manifest, opened.target, opened.draft
    identity, keys = opened.checks["identity"], opened.checks["weight_keys"]
    from dspark.decode import GenerationConfig

    decoder = opened.decoder()
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
        "bundle": str(bundle), "name": manifest.name, "ok": True, "files_checked": opened.checks["files_checked"],
        "target": {"name": manifest.target.name, **identity, "weight_keys": keys["target"]},
        "draft": {"name": manifest.draft.name, "weight_keys": keys["draft"],
                  "acceptance_head": manifest.head_dir, "schema_version": manifest.schema_version},
        "decode": {"prompt": prompt, "tokens": result.token_ids, "text": target.tokenizer.decode(result.token_ids),
                   "equal_to_target": True, "draft_length": manifest.policy.draft_length,
                   "mode": getattr(decoder, "mode", "same-tokenizer"),
                   "drafted": st.drafted, "accepted": st.accepted, "acceptance_rate": st.acceptance_rate,
                   "mean_accepted_tokens": st.mean_accepted_tokens},
    }

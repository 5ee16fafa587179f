"""Deployable bundles: `export_bundle` packages a (target, draft) pair with its decoding policy, measured
numbers, engine configs and the sha256 of every file; `verify_bundle` checks one end to end.

Submodules load lazily so importing the package stays cheap (no torch)."""

from dspark.bundle.manifest import (MANIFEST_NAME, SCHEMA_VERSION, BundleManifest, Metrics, SelectionSpec,
                                    read_manifest)

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "BundleManifest", "Metrics", "SelectionSpec", "export_bundle",
           "read_manifest", "verify_bundle", "check_files", "check_weight_keys"]


def __getattr__(name: str):
    if name == "export_bundle":
        from dspark.bundle.export import export_bundle
        return export_bundle
    if name in ("verify_bundle", "check_files"):
        from dspark.bundle import verify
        return getattr(verify, name)
    if name == "check_weight_keys":
        from dspark.bundle.weights import check_weight_keys
        return check_weight_keys
    raise AttributeError(f"module 'dspark.bundle' has no attribute {name!r}")

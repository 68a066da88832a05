"""``manifest.json``: what a bundle holds, where it came from, and proof it was checked.

The one place that reads and writes it. It is written last, after every artifact passed its
checks, and it carries each file's sha256, so a bundle whose files do not match it is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.schema import build

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 3
# 1: before tied_embeddings and embedding_tables (read as None); 2: before a parity's top1_tie and
# strict_top1_agreement (read as 0.0 and None: top-1 then asked for the same token)
_READABLE_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True)
class FactorNodes:
    """Linear/MatMul nodes counted in one exported graph.

    A factor pair must appear as 2 nodes, a shared-``down`` group of k members as 1 + k;
    a pair folded back into one dense weight would appear as 1 node of the dense shape.
    """

    pairs: int  # factor pairs in the source checkpoint
    shared_groups: int
    expected: int
    found: int
    dense_linears: int  # weight-carrying matmuls that are not factors (unfactored layers, lm_head)


@dataclass(frozen=True)
class Parity:
    prompts: int
    positions: int
    max_abs_logit_diff: float
    logit_scale: float  # largest |reference logit|, so the diff can be read relatively
    top1_agreement: float
    new_tokens: int
    greedy_match: bool
    passed: bool
    p95_abs_logit_diff: float | None = None  # 95th percentile over positions of each one's max |logit diff|
    # the tasks whose text the prompts are (parity_tasks); None: an older bundle, checked on math, code, prose
    tasks: tuple[str, ...] | None = None
    # top1_agreement counted near-ties within this x logit_scale (the lowering check), and then the
    # agreement on the same top token; 0.0 and None: top-1 asked for the same token
    top1_tie: float = 0.0
    strict_top1_agreement: float | None = None


@dataclass(frozen=True)
class FormatEntry:
    files: dict[str, FileEntry]  # path relative to the bundle -> size and hash
    export_seconds: float
    quantize: str
    backend: str | None
    factor_nodes: FactorNodes
    delegation: dict[str, int] | None  # ExecuTorch: nodes delegated to the backend vs left on CPU kernels
    parity: Parity | None  # None when the self-check was skipped
    # copies of a tied embedding table found in this format's files (must be 1); None: untied, or schema 1
    embedding_tables: int | None = None
    # what a quantizer did beyond --quantize/--group-size (ONNX int4: blocks, partial blocks, head, embedding)
    quantization: dict | None = None
    # the artifact against the PyTorch model with the same quantized weights it lowered (ExecuTorch int4):
    # what the lowering changed, apart from what quantizing changed; None where there is no such model
    lowering: Parity | None = None


@dataclass(frozen=True)
class SourceModel:
    path: str
    sha256: str  # over the weight files, config and factorization record, in name order
    files: dict[str, str]  # name -> sha256
    factorized: bool
    compression: dict | None  # the source's compression.json, when it has one


@dataclass(frozen=True)
class ModelSummary:
    total_params: int
    decoder_linear_params: int
    dense_decoder_linear_params: int
    vocab_size: int
    layers: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    ranks: dict[str, int]  # factorized module -> rank
    # the head reads the token-embedding table (total_params counts it once); None: schema 1
    tied_embeddings: bool | None = None


@dataclass(frozen=True)
class Manifest:
    source: SourceModel
    model: ModelSummary
    options: dict
    tokenizer_files: dict[str, FileEntry]
    formats: dict[str, FormatEntry]
    versions: dict[str, str]
    # the exporting process's peak resident memory after each stage ("load", then each format), MB
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, bundle: Path) -> Manifest:
        path = Path(bundle) / MANIFEST_FILE
        if not Path(bundle).exists():
            raise RankdownError(f"{bundle}: no such folder")
        if not path.is_file():
            raise RankdownError(f"{bundle}: not a rankdown bundle (no {MANIFEST_FILE})")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or raw.get("schema_version") not in _READABLE_VERSIONS:
                raise ValueError(f"schema_version {raw.get('schema_version') if isinstance(raw, dict) else None!r} "
                                 f"is not one of {', '.join(map(str, _READABLE_VERSIONS))}")
            return build(cls, raw, "manifest")
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise RankdownError(f"{path}: invalid manifest: {e}") from None

    def all_files(self) -> dict[str, FileEntry]:
        files = dict(self.tokenizer_files)
        for entry in self.formats.values():
            files.update(entry.files)
        return files


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path, paths: list[Path]) -> dict[str, FileEntry]:
    return {p.relative_to(root).as_posix(): FileEntry(p.stat().st_size, sha256_file(p)) for p in sorted(paths)}


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists inside the bundle with its recorded size and hash."""
    root = Path(bundle).resolve()
    for rel, entry in manifest.all_files().items():
        path = (root / rel)
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise RankdownError(f"{bundle}: manifest entry {rel!r} points outside the bundle")
        if not path.is_file():
            raise RankdownError(f"{bundle}: {rel} is listed in the manifest but missing")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise RankdownError(f"{bundle}: {rel} does not match the manifest (size or sha256 differs)")

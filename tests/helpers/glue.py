"""Small GLUE folders written byte for byte in each task's real format (the suite must not
need the real files): CoLA without a header and without a final newline, MRPC with a BOM,
sentences that start with or contain double quotes, QQP with a truncated row, MNLI's two dev
splits with their many columns. SST-2 is learnable: the label is the word good/bad."""

from __future__ import annotations

import random
from pathlib import Path

from tests.helpers.prose import make_prose

BOM = "\ufeff"


def sentences(n: int, seed: int) -> list[str]:
    prose = " ".join(make_prose(n, seed))
    out = [s.strip() + "." for s in prose.split(".") if s.strip()]
    return out[:n]


def shifted(items: list[str], offset: int) -> list[tuple[str, str]]:
    return list(zip(items, items[offset:], strict=False))


def write(path: Path, lines: list[str], final_newline: bool = True, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + ("\n" if final_newline else "")
    path.write_text((BOM if bom else "") + text, encoding="utf-8")


def sst2_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Balanced, and the label is only in the word good / bad, at a random position."""
    rng = random.Random(seed)
    rows = []
    for i, s in enumerate(sentences(n, seed)):
        label = i % 2
        words = s.lower().rstrip(".").split()
        words.insert(rng.randrange(len(words) + 1), "good" if label else "bad")
        rows.append((" ".join(words) + " ", label))  # SST-2 sentences end with a space
    return rows


def write_glue(root: Path) -> Path:
    """All nine tasks under `root` in the original layout; returns root."""
    s = sentences(40, 1)
    # CoLA: source, label, original mark ('*' when unacceptable), sentence; no header.
    cola = [f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\t{x}" for i, x in enumerate(s[:24])]
    cola[3] = 'gj04\t1\t\t"Quotes" open this sentence, and "quote" inside it.'
    write(root / "CoLA/train.tsv", cola[:16])
    write(root / "CoLA/dev.tsv", cola[16:], final_newline=False)

    for split, rows in (("train", sst2_rows(256, 2)), ("dev", sst2_rows(32, 3))):
        write(root / f"SST-2/{split}.tsv", ["sentence\tlabel", *(f"{t}\t{y}" for t, y in rows)])

    mrpc = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    mrpc += [f"{i % 2}\t{700 + i}\t{800 + i}\t{a}\t{b}" for i, (a, b) in enumerate(shifted(s, 1))]
    mrpc[2] = '1\t702\t802\tHe said " the witness " lied .\t" The witness " lied , he said .'
    write(root / "MRPC/train.tsv", mrpc[:20], bom=True)
    write(root / "MRPC/dev.tsv", [mrpc[0], *mrpc[20:30]], bom=True)

    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    stsb = [f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t"
            f"{(i * 0.37) % 5:.3f}" for i, (a, b) in enumerate(shifted(s, 2))]  # fmt: skip
    write(root / "STS-B/train.tsv", [head, *stsb[:20]])
    write(root / "STS-B/dev.tsv", [head, *stsb[20:30]])

    qqp = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    qqp += [f"{i}\t{2 * i}\t{2 * i + 1}\tWhy {a}?\tHow {b}?\t{i % 2}" for i, (a, b) in
            enumerate(shifted(s, 3))]  # fmt: skip
    qqp.insert(5, "99\t198\t199\tA question cut short")  # QQP's real files have such rows
    write(root / "QQP/train.tsv", qqp[:20])
    write(root / "QQP/dev.tsv", [qqp[0], *qqp[20:30]])

    labels = ("entailment", "neutral", "contradiction")
    cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
            "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
            "sentence2"]  # fmt: skip

    def mnli(split: str, pairs: list[tuple[str, str]], votes: int) -> list[str]:
        header = "\t".join([*cols, *(f"label{v + 1}" for v in range(votes)), "gold_label"])
        rows = []
        for i, (a, b) in enumerate(pairs):
            y = labels[i % 3]
            parse = f"( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})"
            rows.append("\t".join([str(i), str(i), f"{i}n", split, parse, a, b, *[y] * votes, y]))
        return [header, *rows]

    pairs = shifted(s, 4)
    write(root / "MNLI/train.tsv", mnli("fiction", pairs[:18], 1))
    write(root / "MNLI/dev_matched.tsv", mnli("fiction", pairs[18:27], 5))
    write(root / "MNLI/dev_mismatched.tsv", mnli("letters", pairs[27:36], 5))

    qnli = ["index\tquestion\tsentence\tlabel"]
    qnli += [f"{i}\tWho {a}?\t{b}\t{('entailment', 'not_entailment')[i % 2]}"
             for i, (a, b) in enumerate(shifted(s, 5))]  # fmt: skip
    write(root / "QNLI/train.tsv", qnli[:20])
    write(root / "QNLI/dev.tsv", [qnli[0], *qnli[20:30]])

    rte = ["index\tsentence1\tsentence2\tlabel"]
    rte += [f"{i}\t{a}\t{b}\t{('entailment', 'not_entailment')[i % 3 == 0]}"
            for i, (a, b) in enumerate(shifted(s, 6))]  # fmt: skip
    write(root / "RTE/train.tsv", rte[:20])
    write(root / "RTE/dev.tsv", [rte[0], *rte[20:30]])

    wnli = ["index\tsentence1\tsentence2\tlabel"]
    wnli += [f"{i}\t{a}\t{b}\t{i % 2}" for i, (a, b) in enumerate(shifted(s, 7))]
    write(root / "WNLI/train.tsv", wnli[:20])
    write(root / "WNLI/dev.tsv", [wnli[0], *wnli[20:30]])
    return root

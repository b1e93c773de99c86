"""Peak memory and time of page encoding (`stages.evaluate`) and contrastive pair loading (`stages.contrast`'s
`load_pairs`) on corpora of N and 8N pages: memory must not grow with the corpus (issue 16, item 5).

    .venv/bin/python bench/memory_scale.py --pages 40 --out bench/results/memory_scale_cpu2.txt
    .venv/bin/python bench/memory_scale.py --pages 40 --compare_tree /tmp/old   # also run another checkout

Builds the tiny base model, English PDFs of one-page documents (a bookmark per page, so `data_prep evalset` makes
one query per page) rendered by `data_prep pages` at the 1M-pixel budget, then runs each case in a fresh process
and reads its peak resident memory from the kernel (`wait4`). With `--compare_tree`, the same commands run in
that checkout too (e.g. `git worktree add /tmp/old <commit>`), so before and after are measured in one run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pymupdf

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny.yaml"  # each checkout's own: recipe keys change with the code
# works in checkouts from before and after the code moved from stages/ to common/ and lco/
LOAD_PAIRS = """
import sys
try:
    from common.recipe import parse_stage_arguments
except ImportError:
    from stages.recipe import parse_stage_arguments
from stages.contrast import ContrastArguments, load_pairs
_, args = parse_stage_arguments("contrast", (ContrastArguments,), sys.argv[1:])
train, held_out, counts = load_pairs(args, 42)
print(counts)
"""


def write_pdfs(folder: Path, pages: int) -> None:
    """One-page English documents of UDHR paragraphs, each page bookmarked with its first words."""
    paragraphs = [p for p in (REPO / "samples/udhr/en.md").read_text(encoding="utf-8").split("\n\n") if len(p) > 80]
    folder.mkdir(parents=True)
    for number in range(pages):
        document = pymupdf.open()
        page = document.new_page(width=595, height=842)  # A4 in points: ~2M pixels at 144 dpi, scaled to 1M
        text = "\n\n".join(paragraphs[(number + k) % len(paragraphs)] for k in range(6))
        page.insert_textbox(page.rect + (50, 50, -50, -50), text, fontsize=10)
        document.set_toc([[1, f"section {number} " + paragraphs[number % len(paragraphs)][:40], 1]])
        document.save(folder / f"doc{number:05d}.pdf")


def measure(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """(peak resident memory in MiB, wall seconds, last output line) of `command` run in a process of its own."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    lines = [line for line in output.splitlines() if line.strip()]
    return usage.ru_maxrss / 1024, time.monotonic() - started, lines[-1] if lines else ""


def prepare(work: Path, pages: int) -> tuple[Path, Path]:
    """(pages dataset, eval set) of `pages` pages under `work`."""
    python = [sys.executable, "-m", "data_prep"]
    write_pdfs(work / "pdfs", pages)
    run = {"check": True, "cwd": REPO, "capture_output": True}
    subprocess.run([*python, "pages", "--lang", "en", "--input", str(work / "pdfs"), "--output", str(work / "pages"),
                    "--ocr", "never"], **run)  # fmt: skip
    subprocess.run([*python, "evalset", "--lang", "en", "--pages", str(work / "pages"), "--output",
                    str(work / "evalset")], **run)  # fmt: skip
    return work / "pages", work / "evalset"


def cases(base: Path, pages: Path, evalset: Path, work: Path) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "evaluate (encode every page and query)": [
            python, "-m", "stages.evaluate", "--config", RECIPE, "--model", str(base), "--data", str(evalset),
            "--cache_dir", str(work / f"cache-{time.monotonic_ns()}"), "--batch_size", "8",
        ],
        "contrast pairs (load_pairs)": [
            python, "-c", LOAD_PAIRS, "--config", RECIPE, "--model_name_or_path", str(base), "--pages_datasets",
            str(pages), "--output_dir", str(work / "contrast"), "--multimodal_fraction", "0.5",
            "--contrastive_batch_size", "8",
        ],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=40, help="N: the small corpus; the large one has 8N pages.")
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--compare_tree", help="Another checkout to run the same cases in (e.g. the code before).")
    parser.add_argument("--out", help="Also write the table to this file.")
    args = parser.parse_args()

    trees = {"this tree": REPO, **({"compare tree": Path(args.compare_tree)} if args.compare_tree else {})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "base"
        subprocess.run([sys.executable, "-m", "stages.base_model", "--config", RECIPE, "--output_dir", str(base)],
                       check=True, cwd=REPO, capture_output=True)  # fmt: skip
        corpora = {n: prepare(work / f"n{n}", n) for n in (args.pages, args.pages * args.factor)}
        for tree_name, tree in trees.items():
            for case_name in cases(base, *corpora[args.pages], work):
                figures = []
                for n, (pages, evalset) in corpora.items():
                    rss, seconds, last = measure(cases(base, pages, evalset, work / f"n{n}")[case_name], tree)
                    figures.append((n, rss, seconds))
                    print(f"{tree_name}: {case_name}, {n} pages: {rss:.0f} MiB, {seconds:.1f}s ({last[:80]})")
                (n_small, rss_small, s_small), (n_large, rss_large, s_large) = figures
                rows.append((tree_name, case_name, n_small, rss_small, s_small, n_large, rss_large, s_large))

    header = "| code | case | pages | peak RSS | time | pages | peak RSS | time | RSS ratio | time ratio |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for tree_name, case_name, n1, r1, s1, n2, r2, s2 in rows:
        lines.append(
            f"| {tree_name} | {case_name} | {n1} | {r1:.0f} MiB | {s1:.1f}s | {n2} | {r2:.0f} MiB | {s2:.1f}s "
            f"| {r2 / r1:.2f}x | {s2 / s1:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(f"$ {' '.join(sys.argv)}\n{table}\n", encoding="utf-8")


if __name__ == "__main__":
    main()

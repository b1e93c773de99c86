"""Spoken questions for written pages: an eval set's text queries read aloud by espeak-ng.

    python -m data_prep speak --evalset checkpoints/km/evalset --output checkpoints/km/evalset-spoken

The output is the same eval set (corpus, qrels, page images, the documents it covers) whose queries are audio:
each query's `audio` is `audio/<id>.wav`, its `text` is empty and its `transcript` keeps what was read, so an
omnimodal model is scored on spoken query -> page image (`stages.evaluate --data`). espeak-ng is a formant
synthesiser: its voices are robotic but cover many languages (`espeak-ng --voices`); the voice is the query's
language's (`lang` in queries.jsonl, else `--lang`).
"""

import json
import shutil
import subprocess
from pathlib import Path

from common.artifacts import atomic_directory
from common.errors import UsageError

BEIR_COPIED = ("corpus.jsonl", "qrels.tsv", "evalset.json", "images")


def espeak() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise UsageError(
            "espeak-ng is not installed; run `bash setup/install.sh` (it installs the Debian package espeak-ng)."
        )
    return path


def voices() -> list[str]:
    """The language codes of the installed espeak-ng voices (`en-gb`, `vi`, `my`, ...)."""
    listing = subprocess.run([espeak(), "--voices"], capture_output=True, text=True, check=True).stdout
    return [line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1]


def voice_for(lang: str, available: list[str]) -> str:
    """The espeak-ng voice of `lang`: its own code, else the first of its regional voices."""
    if lang in available:
        return lang
    regional = [voice for voice in available if voice.startswith(f"{lang}-")]
    if not regional:
        raise UsageError(
            f"espeak-ng has no voice for language `{lang}`; the installed voices are listed by `espeak-ng --voices` "
            "(none for Khmer, Lao or Tagalog in espeak-ng 1.51). Leave those queries out, or give audio of your own."
        )
    return regional[0]


def read_queries(evalset: Path) -> list[dict]:
    path = evalset / "queries.jsonl"
    if not path.is_file():
        raise UsageError(f"--evalset {evalset} has no queries.jsonl; give a folder written by `data_prep evalset`.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise UsageError(f"{path} line {number} is not a JSON object; fix the eval set.")
        rows.append(row)
    without_text = [str(row.get("_id")) for row in rows if not str(row.get("text") or "").strip()]
    if without_text:
        raise UsageError(f"--evalset {evalset}: {len(without_text)} queries have no text to read ({without_text[:5]}).")
    return rows


def speak_evalset(evalset: str, output: str, default_lang: str | None, rate: int) -> dict:
    """Write `output`, the eval set `evalset` with its queries spoken; return counts per voice."""
    source = Path(evalset)
    rows = read_queries(source)
    available = voices()
    langs = {str(row.get("lang") or default_lang or "") for row in rows}
    if "" in langs:
        raise UsageError(f"--evalset {evalset}: queries without a `lang`; give --lang, the language they are in.")
    voice = {lang: voice_for(lang, available) for lang in sorted(langs)}  # every language checked before any work
    binary = espeak()
    counts: dict[str, int] = {}
    with atomic_directory(output) as folder:
        for name in BEIR_COPIED:
            if (source / name).is_dir():
                shutil.copytree(source / name, folder / name)
            elif (source / name).is_file():
                shutil.copy2(source / name, folder / name)
        (folder / "audio").mkdir()
        spoken = []
        for row in rows:
            lang = str(row.get("lang") or default_lang)
            wav = Path("audio") / f"{len(spoken):06d}.wav"  # ids may hold any character; the file name does not
            subprocess.run(
                [binary, "-v", voice[lang], "-s", str(rate), "-w", str(folder / wav), "--stdin"],
                input=row["text"],
                text=True,
                check=True,
                capture_output=True,
            )
            spoken.append({**row, "text": "", "audio": str(wav), "transcript": row["text"], "voice": voice[lang]})
            counts[voice[lang]] = counts.get(voice[lang], 0) + 1
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in spoken)
        (folder / "queries.jsonl").write_text(lines, encoding="utf-8")
    return counts

"""English→Spanish Bible verse pairs from two public-domain SWORD modules, built offline.

    python -m kdtw.bible build --out data/bible_en_es     # ~10 s; needs apt-get and dpkg-deb
    python -m kdtw.bible check --out data/bible_en_es     # sha256 and row counts of the files

English is the World English Bible (Debian package ``sword-text-web``, module engWEB2015eb,
NRSVA versification with the deuterocanon); Spanish is the Reina-Valera 1909 (``sword-text-sparv``,
module spaRV1909eb, KJV versification). Both are public domain. The two ``.deb`` files are fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a temporary folder (nothing is
installed); the modules are read with ``struct`` and ``zlib`` alone:

- ``<testament>.bzs``: one 12-byte record per compressed block, ``(offset, size, raw_size)``
  (little-endian u32) into ``<testament>.bzz``, which holds the zlib blocks;
- ``<testament>.bzv``: one 10-byte record per index position, ``(block, offset, size)`` (u32,
  u32, u16) into the decompressed block. Positions follow the versification: module and
  testament headings, then per book a book heading and per chapter a chapter heading (holding
  ``<chapter osisID="Gen.1" sID=...>``) followed by one position per verse.

The verse number of a position is its distance from the last chapter heading, and the position
right before the heading of a new book's first chapter is that book's heading, not a verse. So
the text needs no versification table. English and Spanish verses are joined on
``(book, chapter, verse)`` over the 66 books both have (the deuterocanon is dropped). The two
versifications agree on almost every verse. Where they don't, a pair is dropped by the length-ratio filter,
or, where a verse exists in one module only, by the join.

Splits depend only on a verse's reference (a hash), so a verse never changes split when the
filter changes: about 3.2% validation, 3.2% test, the rest train. Each split is a Parquet file
(zstd) with columns ``source`` (English), ``target`` (Spanish), ``book`` (OSIS id), ``chapter``,
``verse``; ``checksums.json`` records their sha256, row counts and the two packages used.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# The 66 books both modules share, in canonical order (OSIS ids).
CANON = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov "
    "Eccl Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal "
    "Matt Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm "
    "Heb Jas 1Pet 2Pet 1John 2John 3John Jude Rev"
).split()
BOOK_INDEX = {b: i for i, b in enumerate(CANON)}
SPLITS = ("train", "validation", "test")
COLUMNS = ("source", "target", "book", "chapter", "verse")
CHECKSUMS = "checksums.json"


@dataclass(frozen=True)
class Module:
    """One SWORD module inside one Debian package."""

    package: str
    module: str  # folder name under usr/share/sword/modules/texts/ztext/
    lang: str


ENGLISH = Module(package="sword-text-web", module="engWEB2015eb", lang="en")
SPANISH = Module(package="sword-text-sparv", module="spaRV1909eb", lang="es")


class BibleError(RuntimeError):
    """A build problem; the message says what to do."""


@dataclass(frozen=True)
class Verse:
    book: str  # OSIS id, e.g. "Gen"
    chapter: int
    verse: int
    text: str

    @property
    def ref(self) -> str:
        return f"{self.book}.{self.chapter}.{self.verse}"


@dataclass(frozen=True)
class Pair:
    book: str
    chapter: int
    verse: int
    source: str
    target: str

    @property
    def ref(self) -> str:
        return f"{self.book}.{self.chapter}.{self.verse}"


# ----------------------------------------------------------------------------- zText reading

_BZS = struct.Struct("<III")  # block: offset, compressed size, raw size
_BZV = struct.Struct("<IIH")  # position: block, offset in the raw block, size


def read_ztext(folder: str | os.PathLike, testament: str) -> list[str]:
    """Raw OSIS text of every index position of one testament ("ot" or "nt") of a zText
    module folder; an unused position is ""."""
    base = Path(folder)
    try:
        bzs = (base / f"{testament}.bzs").read_bytes()
        bzv = (base / f"{testament}.bzv").read_bytes()
        bzz = (base / f"{testament}.bzz").read_bytes()
    except FileNotFoundError as e:
        raise BibleError(f"{base} is not a zText module: {e.filename} is missing") from None
    blocks: dict[int, bytes] = {}
    out: list[str] = []
    for pos in range(len(bzv) // _BZV.size):
        block, offset, size = _BZV.unpack_from(bzv, pos * _BZV.size)
        if size == 0:
            out.append("")
            continue
        if block not in blocks:
            start, length, _ = _BZS.unpack_from(bzs, block * _BZS.size)
            blocks[block] = zlib.decompress(bzz[start : start + length])
        out.append(blocks[block][offset : offset + size].decode("utf-8"))
    return out


_CHAPTER_START = re.compile(r'<chapter\b[^>]*\bsID="[^"]*"[^>]*>')
_OSIS_ID = re.compile(r'\bosisID="([^".]+)\.(\d+)"')


def raw_verses(entries: list[str]) -> Iterator[tuple[str, int, int, str]]:
    """``(book, chapter, verse, raw OSIS)`` of every verse position of one testament."""
    heads: dict[int, tuple[str, int]] = {}
    for pos, text in enumerate(entries):
        m = _CHAPTER_START.search(text)
        if m:
            ident = _OSIS_ID.search(m.group(0))
            if ident is None:
                raise BibleError(f"chapter marker without osisID at position {pos}: {m.group(0)}")
            heads[pos] = (ident.group(1), int(ident.group(2)))
    book_heads = set()
    prev_book = None
    for pos in sorted(heads):
        book = heads[pos][0]
        if book != prev_book:
            book_heads.add(pos - 1)  # the new book's heading sits right before its first chapter
        prev_book = book
    current: tuple[str, int] | None = None
    head_pos = 0
    for pos, text in enumerate(entries):
        if pos in heads:
            current, head_pos = heads[pos], pos
        elif current is not None and pos not in book_heads:
            yield current[0], current[1], pos - head_pos, text


_DROP = re.compile(  # footnotes, cross references, speaker labels: not part of the verse
    r"<(note|speaker)\b[^>]*>.*?</\1>", re.S
)
_TITLE = re.compile(r"<title\b([^>]*)>(.*?)</title>", re.S)
_INLINE = re.compile(r"</?(w|transChange|seg|name|q|rdg|hi|foreign|divineName)\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?)\]’”»])")
_SPACE_AFTER = re.compile(r"([(\[“‘«¿¡])\s+")


def clean_osis(raw: str) -> str:
    """Plain verse text: notes, speaker labels and editorial headings dropped; a canonical
    title (a psalm's superscription, which the Spanish has as plain text) kept."""
    text = _DROP.sub(" ", raw)
    text = _TITLE.sub(lambda m: m.group(2) if 'canonical="true"' in m.group(1) else " ", text)
    text = _INLINE.sub("", text)  # inline markup: no word boundary of its own
    text = _TAG.sub(" ", text)  # block markup (lines, paragraphs, milestones): a space
    text = html.unescape(text)
    text = " ".join(text.split())
    text = _SPACE_BEFORE.sub(r"\1", text)
    return _SPACE_AFTER.sub(r"\1", text)


_CAPS_WORD = re.compile(r"^(\W*(?:\w+\s+)?)([^\W\d_]{2,})\b")


def uncap_chapter_start(text: str) -> str:
    """The RV1909 prints the first word of a chapter in capitals ("Y FUERON acabados",
    "EN el principio"); give it ordinary case ("Y Fueron", "En el")."""
    m = _CAPS_WORD.match(text)
    if m and m.group(2).isupper():
        word = m.group(2)
        return text[: m.start(2)] + word[0] + word[1:].lower() + text[m.end(2) :]
    return text


def module_verses(folder: str | os.PathLike, *, uncap_first: bool = False) -> list[Verse]:
    """Every non-empty verse of a zText module folder (both testaments), cleaned."""
    out: list[Verse] = []
    for testament in ("ot", "nt"):
        if not (Path(folder) / f"{testament}.bzv").exists():
            continue
        for book, chapter, verse, raw in raw_verses(read_ztext(folder, testament)):
            text = clean_osis(raw)
            if uncap_first and verse == 1:
                text = uncap_chapter_start(text)
            if text:
                out.append(Verse(book, chapter, verse, text))
    if not out:
        raise BibleError(f"no verses found in {folder}")
    return out


# ----------------------------------------------------------------------------- pairs

def align(english: Iterable[Verse], spanish: Iterable[Verse]) -> list[Pair]:
    """Verse pairs joined on (book, chapter, verse) over the 66 shared books, canonical order."""
    es = {(v.book, v.chapter, v.verse): v.text for v in spanish if v.book in BOOK_INDEX}
    pairs = [
        Pair(v.book, v.chapter, v.verse, v.text, es[(v.book, v.chapter, v.verse)])
        for v in english
        if v.book in BOOK_INDEX and (v.book, v.chapter, v.verse) in es
    ]
    pairs.sort(key=lambda p: (BOOK_INDEX[p.book], p.chapter, p.verse))
    return pairs


def length_ratio(pair: Pair) -> float:
    """Characters of the Spanish over characters of the English."""
    return len(pair.target) / max(1, len(pair.source))


def filter_pairs(
    pairs: Iterable[Pair], *, min_ratio: float = 0.6, max_ratio: float = 1.8, min_chars: int = 2
) -> tuple[list[Pair], dict[str, int]]:
    """Drop pairs whose length ratio (Spanish / English, characters) is outside
    ``[min_ratio, max_ratio]``, where verse boundaries differ, or with a side under
    ``min_chars``. Returns the kept pairs and counts of why the others went."""
    kept: list[Pair] = []
    dropped = {"short": 0, "ratio": 0}
    for p in pairs:
        if min(len(p.source), len(p.target)) < min_chars:
            dropped["short"] += 1
        elif not min_ratio <= length_ratio(p) <= max_ratio:
            dropped["ratio"] += 1
        else:
            kept.append(p)
    return kept, dropped


def split_of(ref: str, *, per_mille: int = 32) -> str:
    """A verse's split from a hash of its reference ("Gen.1.1"): ``per_mille``/1000 each to
    validation and test, the rest to train. Stable across filters, runs and machines."""
    bucket = int.from_bytes(hashlib.sha256(ref.encode()).digest()[:8], "big") % 1000
    if bucket < per_mille:
        return "validation"
    if bucket < 2 * per_mille:
        return "test"
    return "train"


# ----------------------------------------------------------------------------- files

def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_split(pairs: list[Pair], path: str | os.PathLike) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "source": pa.array([p.source for p in pairs], pa.string()),
            "target": pa.array([p.target for p in pairs], pa.string()),
            "book": pa.array([p.book for p in pairs], pa.string()),
            "chapter": pa.array([p.chapter for p in pairs], pa.int32()),
            "verse": pa.array([p.verse for p in pairs], pa.int32()),
        }
    )
    pq.write_table(table, path, compression="zstd", compression_level=19)


def verify(folder: str | os.PathLike) -> dict:
    """Check every file listed in ``checksums.json`` (sha256 and row count); returns it."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    meta_path = folder / CHECKSUMS
    if not meta_path.exists():
        raise BibleError(f"{meta_path} is missing: run `python -m kdtw.bible build --out {folder}`")
    meta = json.loads(meta_path.read_text())
    for name, info in meta["files"].items():
        path = folder / name
        if not path.exists():
            raise BibleError(f"{path} is missing: rebuild with `python -m kdtw.bible build`")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise BibleError(f"{path}: sha256 {digest} != {info['sha256']} in {CHECKSUMS}")
        rows = pq.ParquetFile(path).metadata.num_rows
        if rows != info["rows"]:
            raise BibleError(f"{path}: {rows} rows != {info['rows']} in {CHECKSUMS}")
    return meta


# ----------------------------------------------------------------------------- build

def _run(cmd: list[str], cwd: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BibleError(f"`{cmd[0]}` not found: build on a Debian/Ubuntu machine") from None
    if done.returncode != 0:
        hint = " (run `apt-get update` first)" if cmd[0] == "apt-get" else ""
        raise BibleError(f"`{' '.join(cmd)}` failed{hint}: {done.stderr.strip()[-500:]}")
    return done.stdout


def fetch_debs(workdir: str, debs_dir: str | None = None) -> dict[str, Path]:
    """The two .deb files: taken from ``debs_dir`` when given, else ``apt-get download``ed."""
    found: dict[str, Path] = {}
    if debs_dir is None:
        _run(["apt-get", "download", ENGLISH.package, SPANISH.package], cwd=workdir)
        debs_dir = workdir
    for mod in (ENGLISH, SPANISH):
        matches = sorted(Path(debs_dir).glob(f"{mod.package}_*.deb"))
        if not matches:
            raise BibleError(f"no {mod.package}_*.deb in {debs_dir}: `apt-get download {mod.package}`")
        found[mod.package] = matches[-1]
    return found


def build(
    out: str | os.PathLike,
    *,
    debs_dir: str | None = None,
    min_ratio: float = 0.6,
    max_ratio: float = 1.8,
    log=print,
) -> dict:
    """Fetch, parse, align, filter, split and write ``out``; returns the checksums.json dict."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="kdtw_bible_") as work:
        debs = fetch_debs(work, debs_dir)
        sources, verses = {}, {}
        for mod in (ENGLISH, SPANISH):
            deb = debs[mod.package]
            root = Path(work) / mod.package
            _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=work)
            version = _run(["dpkg-deb", "-f", str(deb), "Version"], cwd=work).strip()
            folder = root / "usr/share/sword/modules/texts/ztext" / mod.module
            verses[mod.lang] = module_verses(folder, uncap_first=mod is SPANISH)
            sources[mod.lang] = {
                "package": mod.package,
                "version": version,
                "module": mod.module,
                "deb_sha256": sha256_file(deb),
                "verses": len(verses[mod.lang]),
            }
            log(f"[bible] {mod.package} {version}: {len(verses[mod.lang])} verses")
    pairs = align(verses["en"], verses["es"])
    kept, dropped = filter_pairs(pairs, min_ratio=min_ratio, max_ratio=max_ratio)
    log(f"[bible] {len(pairs)} aligned pairs, {len(kept)} kept (dropped {dropped})")
    by_split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in kept:
        by_split[split_of(p.ref)].append(p)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = {}
        for split in SPLITS:
            name = f"{split}.parquet"
            write_split(by_split[split], tmp / name)
            files[name] = {"sha256": sha256_file(tmp / name), "rows": len(by_split[split])}
        meta = {
            "sources": sources,
            "filter": {"min_ratio": min_ratio, "max_ratio": max_ratio, "min_chars": 2},
            "pairs": {"aligned": len(pairs), "kept": len(kept), "dropped": dropped},
            "files": files,
        }
        (tmp / CHECKSUMS).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[bible] wrote {out}: " + ", ".join(f"{n} {f['rows']}" for n, f in files.items()))
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdtw.bible", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch the two .deb files and write the Parquet splits")
    b.add_argument("--out", default="data/bible_en_es", help="output folder")
    b.add_argument("--debs", default=None, help="folder with the .deb files (skips apt-get download)")
    b.add_argument("--min-ratio", type=float, default=0.6, help="lowest Spanish/English length ratio")
    b.add_argument("--max-ratio", type=float, default=1.8, help="highest Spanish/English length ratio")
    c = sub.add_parser("check", help="verify sha256 and row counts against checksums.json")
    c.add_argument("--out", default="data/bible_en_es", help="the folder to check")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.out, debs_dir=args.debs, min_ratio=args.min_ratio, max_ratio=args.max_ratio)
        else:
            meta = verify(args.out)
            print(json.dumps({n: f["rows"] for n, f in meta["files"].items()}))
    except BibleError as e:
        print(f"kdtw.bible: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

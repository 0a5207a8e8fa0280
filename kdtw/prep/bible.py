"""English→Spanish Bible verse pairs from two public-domain SWORD modules, built offline.

    python -m kdtw.prep.bible build --out data/bible_en_es     # ~20 s; needs apt-get and dpkg-deb
    python -m kdtw.prep.bible check --out data/bible_en_es     # sha256 and row counts of the files

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
numberings agree on almost every verse, but the RV1909 follows the Hebrew one in a few
chapters (Num 13, Num 30, 1 Sam 24, Job 39-40, Hos 12, Jonah 2, ...) and merges a verse in a few
others, and a verse pair there holds different text. A length-based alignment of each book
(Gale & Church, :func:`monotone_matches`) finds those runs and their pairs are dropped
("shifted"); then pairs whose Spanish/English length ratio is an outlier are dropped ("ratio").

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
import math
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import make_tmp_dir, recover_dir, remove_dir, replace_dir

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
# Two word elements with nothing between them ("<transChange>y</transChange><w>Jesús</w>")
# are two words, unless the second is an enclitic pronoun ("sáca" + "lo").
_ADJACENT = re.compile(r"</(?:w|transChange)>(?=<(?:w|transChange)\b[^>]*>([^\W\d_]*))")
_ENCLITICS = frozenset("lo la le los las les me te se nos os".split())
_SPACE_BEFORE = re.compile(r"\s+([,.;:!?)\]’”»])")
_SPACE_AFTER = re.compile(r"([(\[“‘«¿¡])\s+")


def clean_osis(raw: str) -> str:
    """Plain verse text: notes, speaker labels and editorial headings dropped; a canonical
    title (a psalm's superscription, which the Spanish has as plain text) kept."""
    text = _DROP.sub(" ", raw)
    text = _ADJACENT.sub(lambda m: m.group(0) + ("" if m.group(1).lower() in _ENCLITICS else " "), text)
    text = _TITLE.sub(lambda m: m.group(2) if 'canonical="true"' in m.group(1) else " ", text)
    text = _INLINE.sub("", text)  # inline markup: no word boundary of its own
    text = _TAG.sub(" ", text)  # block markup (lines, paragraphs, milestones): a space
    text = html.unescape(text)
    text = " ".join(text.split())
    text = _SPACE_BEFORE.sub(r"\1", text)
    return _SPACE_AFTER.sub(r"\1", text)


_LETTERS = re.compile(r"[^\W\d_]+")


def case_table(texts: Iterable[str]) -> dict[str, str]:
    """Lower-case word -> its usual written form (lower case, or capitalised for names), by
    majority over every word of ``texts`` that is not all capitals."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w in _LETTERS.findall(text) if not (len(w) > 1 and w.isupper()))
    table = {}
    for word in {w.lower() for w in counts}:
        cap = word[:1].upper() + word[1:]
        table[word] = cap if counts[cap] > counts[word] else word
    return table


def uncap_chapter_start(text: str, table: dict[str, str]) -> str:
    """The RV1909 prints the first word of a chapter in capitals ("EN el principio", "Y
    FUERON acabados", "¡OH Jehová" after a psalm's title). Give the first all-capitals word its
    usual form from ``table``, capitalised where it starts a sentence: "En el principio",
    "Y fueron acabados", "¡Oh Jehová"."""
    for m in _LETTERS.finditer(text):
        word = m.group()
        if len(word) < 2 or not word.isupper():
            continue
        before = text[: m.start()].rstrip()
        usual = table.get(word.lower(), word.lower())
        if not before or before[-1] in ".!?¡¿":
            usual = usual[:1].upper() + usual[1:]
        return text[: m.start()] + usual + text[m.end() :]
    return text


def fix_chapter_caps(verses: list[Verse]) -> list[Verse]:
    """:func:`uncap_chapter_start` on the first verse of every chapter."""
    table = case_table(v.text for v in verses)
    return [
        Verse(v.book, v.chapter, v.verse, uncap_chapter_start(v.text, table)) if v.verse == 1 else v
        for v in verses
    ]


def module_verses(folder: str | os.PathLike) -> list[Verse]:
    """Every non-empty verse of a zText module folder (both testaments), cleaned."""
    out: list[Verse] = []
    for testament in ("ot", "nt"):
        if not (Path(folder) / f"{testament}.bzv").exists():
            continue
        for book, chapter, verse, raw in raw_verses(read_ztext(folder, testament)):
            text = clean_osis(raw)
            if text:
                out.append(Verse(book, chapter, verse, text))
    if not out:
        raise BibleError(f"no verses found in {folder}: not a zText Bible module?")
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


def log_ratio_stats(pairs: Iterable[Pair]) -> tuple[float, float]:
    """Robust mean and spread of log(Spanish / English length): median and 1.4826 * MAD."""
    logs = sorted(math.log(max(1e-3, length_ratio(p))) for p in pairs)
    if not logs:
        raise BibleError("no aligned verse pairs: the two modules share no (book, chapter, verse)")
    mu = statistics.median(logs)
    return mu, max(1e-3, 1.4826 * statistics.median(abs(x - mu) for x in logs))


def monotone_matches(
    src_lens: list[int],
    tgt_lens: list[int],
    *,
    mu: float,
    sigma: float,
    skip: float = 5.0,
    merge: float = 3.0,
    cap: float = 6.0,
    band: int = 12,
    src_keys: list | None = None,
    tgt_keys: list | None = None,
    off_key: float = 1.0,
) -> list[tuple[int, int]]:
    """The 1-1 matches ``(i, j)`` of the cheapest monotone alignment of two sequences of text
    lengths, length-based as Gale & Church (1993): moves 1-1, 1-0, 0-1, 2-1 and 1-2, a match
    costs ``min(z**2 / 2, cap)`` with ``z = (log(tgt / src) - mu) / sigma`` (merges add
    ``merge``), a skip costs ``skip``. The cap keeps one odd verse from pulling its neighbours
    out of line; a shifted run of verses still costs more in line than the two skips that
    shift it. With keys (verse references), a match of different keys costs ``off_key`` more:
    the numbering is trusted unless the lengths say otherwise over several verses. Only cells
    within ``band`` of the diagonal are searched."""
    n, m = len(src_lens), len(tgt_lens)

    def cost(s: int, t: int) -> float:
        z = (math.log(max(t, 1) / max(s, 1)) - mu) / sigma
        return min(0.5 * z * z, cap)

    def in_band(i: int, j: int) -> bool:
        return abs(j - (i * m) // max(n, 1)) <= band + abs(n - m)

    best: dict[tuple[int, int], tuple[float, tuple[int, int], bool]] = {(0, 0): (0.0, (0, 0), False)}
    for i in range(n + 1):
        for j in range(m + 1):
            if (i, j) not in best:
                continue
            base = best[(i, j)][0]
            moves = []
            if i < n and j < m:
                c = cost(src_lens[i], tgt_lens[j])
                if src_keys is not None and tgt_keys is not None and src_keys[i] != tgt_keys[j]:
                    c += off_key
                moves.append((i + 1, j + 1, c, True))
            if i < n:
                moves.append((i + 1, j, skip, False))
            if j < m:
                moves.append((i, j + 1, skip, False))
            if i + 1 < n and j < m:
                moves.append((i + 2, j + 1, merge + cost(src_lens[i] + src_lens[i + 1], tgt_lens[j]), False))
            if i < n and j + 1 < m:
                moves.append((i + 1, j + 2, merge + cost(src_lens[i], tgt_lens[j] + tgt_lens[j + 1]), False))
            for a, b, c, one_to_one in moves:
                if not in_band(a, b) and (a, b) != (n, m):
                    continue
                total = base + c
                if (a, b) not in best or total < best[(a, b)][0]:
                    best[(a, b)] = (total, (i, j), one_to_one)
    if (n, m) not in best:  # cannot happen: skips alone always reach the end
        raise BibleError("alignment failed: widen the band")
    matches, cell = [], (n, m)
    while cell != (0, 0):
        _, prev, one_to_one = best[cell]
        if one_to_one:
            matches.append(prev)
        cell = prev
    return matches[::-1]


def consistent_refs(
    english: Iterable[Verse], spanish: Iterable[Verse], *, mu: float, sigma: float
) -> set[str]:
    """References whose English and Spanish verses the length-based alignment of their book
    (:func:`monotone_matches`) pairs with each other. A verse shifted by a versification
    difference (the RV1909 follows the Hebrew numbering in Num 13, 1 Sam 24, Job 39-41, Jonah
    2, ...) or by a merged verse is paired with its neighbour there, so its reference is left
    out."""
    books: dict[str, tuple[list[Verse], list[Verse]]] = {}
    for side, verses in enumerate((english, spanish)):
        for v in verses:
            if v.book in BOOK_INDEX:
                books.setdefault(v.book, ([], []))[side].append(v)
    refs: set[str] = set()
    for en, es in books.values():
        en.sort(key=lambda v: (v.chapter, v.verse))
        es.sort(key=lambda v: (v.chapter, v.verse))
        matches = monotone_matches(
            [len(v.text) for v in en],
            [len(v.text) for v in es],
            mu=mu,
            sigma=sigma,
            src_keys=[v.ref for v in en],
            tgt_keys=[v.ref for v in es],
        )
        refs.update(en[i].ref for i, j in matches if en[i].ref == es[j].ref)
    return refs


def filter_pairs(
    pairs: Iterable[Pair],
    *,
    keep_refs: set[str] | None = None,
    min_ratio: float = 0.6,
    max_ratio: float = 1.8,
    min_chars: int = 2,
) -> tuple[list[Pair], dict[str, int]]:
    """Drop pairs with a side under ``min_chars`` characters, pairs whose reference is not in
    ``keep_refs`` (when given: see :func:`consistent_refs`) and pairs whose length ratio
    (Spanish / English, characters) is outside ``[min_ratio, max_ratio]``. Returns the kept
    pairs and counts of why the others went."""
    kept: list[Pair] = []
    dropped = {"short": 0, "shifted": 0, "ratio": 0}
    for p in pairs:
        if min(len(p.source), len(p.target)) < min_chars:
            dropped["short"] += 1
        elif keep_refs is not None and p.ref not in keep_refs:
            dropped["shifted"] += 1
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
        raise BibleError(f"{meta_path} is missing: create the files with `kdtw data bible-en-es --out {folder}`")
    meta = json.loads(meta_path.read_text())
    for name, info in meta["files"].items():
        path = folder / name
        if not path.exists():
            raise BibleError(f"{path} is missing: create the files again with `kdtw data bible-en-es --out {folder}`")
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
            raise BibleError(f"no {mod.package}_*.deb in {debs_dir}: add it there (`apt-get download {mod.package}` in that "
                             "folder), or leave out --debs to download it")
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
            verses[mod.lang] = module_verses(folder)
            if mod is SPANISH:
                verses[mod.lang] = fix_chapter_caps(verses[mod.lang])
            sources[mod.lang] = {
                "package": mod.package,
                "version": version,
                "module": mod.module,
                "deb_sha256": sha256_file(deb),
                "verses": len(verses[mod.lang]),
            }
            log(f"[bible] {mod.package} {version}: {len(verses[mod.lang])} verses")
    pairs = align(verses["en"], verses["es"])
    mu, sigma = log_ratio_stats(pairs)
    refs = consistent_refs(verses["en"], verses["es"], mu=mu, sigma=sigma)
    kept, dropped = filter_pairs(pairs, keep_refs=refs, min_ratio=min_ratio, max_ratio=max_ratio)
    log(f"[bible] {len(pairs)} aligned pairs, {len(kept)} kept (dropped {dropped})")
    by_split: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    for p in kept:
        by_split[split_of(p.ref)].append(p)

    recover_dir(str(out))
    tmp = Path(make_tmp_dir(str(out)))
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
        replace_dir(str(tmp), str(out))  # the old folder is set aside, never deleted first
    except BaseException:
        remove_dir(str(tmp))
        raise
    log(f"[bible] wrote {out}: " + ", ".join(f"{n} {f['rows']}" for n, f in files.items()))
    return meta


def main(argv: list[str] | None = None, prog: str = "python -m kdtw.prep.bible") -> int:
    """The module's command line; ``prog`` names the command in its errors (`kdtw data
    bible-en-es` passes ``kdtw``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
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
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

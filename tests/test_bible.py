"""The English→Spanish Bible data: the shipped Parquet files, the zText reader, the alignment
and filters (on small synthetic modules), and the whole build from synthetic .deb files."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kdtw.dataset_sources import load_dataset_source
from kdtw.prep import bible
from kdtw.prep.bible import Pair, Verse

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "bible_en_es"
EXPECTED_ROWS = {"train": 28678, "validation": 1066, "test": 999}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


# ----------------------------------------------------------------------------- shipped data


def test_shipped_files_match_checksums():
    meta = bible.verify(SHIPPED)  # sha256 and row count of every file
    assert {n: f["rows"] for n, f in meta["files"].items()} == {
        f"{s}.parquet": n for s, n in EXPECTED_ROWS.items()
    }
    assert meta["pairs"]["kept"] == sum(EXPECTED_ROWS.values())
    total_bytes = sum((SHIPPED / n).stat().st_size for n in meta["files"])
    assert total_bytes < 5_000_000


def test_shipped_files_load_as_a_datasets_task():
    splits = load_dataset_source(
        str(SHIPPED),
        source_column="source",
        target_column="target",
        splits={s: s for s in EXPECTED_ROWS},
        data_files={s: f"{s}.parquet" for s in EXPECTED_ROWS},
    )
    assert {s: len(v) for s, v in splits.items()} == EXPECTED_ROWS
    first = splits["train"][0]
    assert first.source.startswith("In the beginning")
    assert first.target.startswith("En el principio")


def test_shipped_splits_follow_the_reference_hash():
    seen: set[str] = set()
    for split in EXPECTED_ROWS:
        table = pq.read_table(SHIPPED / f"{split}.parquet")
        assert table.column_names == list(bible.COLUMNS)
        rows = table.select(["book", "chapter", "verse"]).to_pylist()
        refs = [f"{r['book']}.{r['chapter']}.{r['verse']}" for r in rows]
        assert all(bible.split_of(ref) == split for ref in refs)
        assert not seen & set(refs)
        seen.update(refs)
        assert set(table.column("book").to_pylist()) <= set(bible.CANON)


# ----------------------------------------------------------------------------- zText


def write_ztext(folder: Path, testament: str, entries: list[str], per_block: int = 3) -> None:
    """A zText testament as SWORD writes it: entries packed ``per_block`` to a zlib block."""
    folder.mkdir(parents=True, exist_ok=True)
    bzs, bzv, bzz = bytearray(), bytearray(), bytearray()
    for start in range(0, len(entries), per_block):
        block, raw = len(bzs) // 12, bytearray()
        for text in entries[start : start + per_block]:
            data = text.encode("utf-8")
            bzv += struct.pack("<IIH", block if data else 0, len(raw) if data else 0, len(data))
            raw += data
        packed = zlib.compress(bytes(raw))
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
    for ext, data in (("bzs", bzs), ("bzv", bzv), ("bzz", bzz)):
        (folder / f"{testament}.{ext}").write_bytes(bytes(data))


def _chapter(ref: str) -> str:
    return f'<chapter n="{ref.split(".")[1]}" osisID="{ref}" sID="{ref}"/>'


def _book(book: str) -> str:
    return f'<div canonical="true" osisID="{book}" sID="b{book}" type="book"/><title type="main">{book}</title>'


ENGLISH_OT = [
    "",
    '<milestone type="x-importer" subType="x-osis2mod"/>',
    _book("Gen") + " A book introduction, not a verse.",
    _chapter("Gen.1"),
    '<w lemma="strong:H7225">In the beginning</w>, <w>God</w><note placement="foot">'
    "<reference>1:1</reference>Elohim.</note> <w>created</w> the heavens and the earth.",
    '<div type="x-milestone" subType="x-preverse" sID="pv1"/><title>The Creation</title>'
    '<div type="x-milestone" subType="x-preverse" eID="pv1"/>The earth was formless &amp; empty.',
    '<q marker="">“Let there be light,”</q> God said. <chapter eID="Gen.1"/>',
    _chapter("Gen.2"),
    '<l level="1" sID="l1"/>The heavens were finished.<l eID="l1"/>',
    "",  # an index position without text
    _chapter("Gen.3"),
    '<title canonical="true" type="psalm">A song.</title> <speaker>Beloved</speaker>Sing.',
    _book("Tob") + " Deuterocanon.",
    _chapter("Tob.1"),
    "Tobit's verse.",
]
SPANISH_OT = [
    "",
    '<milestone type="x-importer" subType="x-osis2mod"/>',
    _book("Gen"),
    _chapter("Gen.1"),
    "<w>EN el principio</w> crió Dios los cielos y la tierra.",
    "Y la tierra estaba desordenada y vacía.",
    "Y dijo Dios: Sea la luz.",
    _chapter("Gen.2"),
    "Y FUERON acabados los cielos.",
    "Un versículo que falta en inglés.",
    _chapter("Gen.3"),
    "Cántico. ¡OH cantad!",
]


def test_read_ztext_round_trips_the_index(tmp_path):
    write_ztext(tmp_path / "mod", "ot", ENGLISH_OT, per_block=4)
    assert bible.read_ztext(tmp_path / "mod", "ot") == ENGLISH_OT


def test_raw_verses_count_from_the_chapter_marker_and_skip_book_headings():
    refs = [(b, c, v) for b, c, v, _ in bible.raw_verses(ENGLISH_OT)]
    assert refs == [
        ("Gen", 1, 1), ("Gen", 1, 2), ("Gen", 1, 3),
        ("Gen", 2, 1), ("Gen", 2, 2),
        ("Gen", 3, 1),  # the Tobit book heading right after it is not Gen 3:2
        ("Tob", 1, 1),
    ]


def test_module_verses_clean_the_markup(tmp_path):
    write_ztext(tmp_path / "en", "ot", ENGLISH_OT)
    verses = {v.ref: v.text for v in bible.module_verses(tmp_path / "en")}
    assert verses == {
        "Gen.1.1": "In the beginning, God created the heavens and the earth.",
        "Gen.1.2": "The earth was formless & empty.",  # an editorial heading dropped
        "Gen.1.3": "“Let there be light,” God said.",
        "Gen.2.1": "The heavens were finished.",
        "Gen.3.1": "A song. Sing.",  # a canonical title kept, a speaker label dropped
        "Tob.1.1": "Tobit's verse.",
    }


def test_adjacent_word_elements_are_separate_words_except_enclitics():
    raw = ('<w>agua</w>: <transChange type="added">y</transChange><w>Jesús</w> <w>sáca</w>'
           '<transChange type="added">lo</transChange><w>de</w> aquí.')
    assert bible.clean_osis(raw) == "agua: y Jesús sácalo de aquí."


def test_module_without_verses_is_an_error(tmp_path):
    with pytest.raises(bible.BibleError, match="not a zText module"):
        bible.read_ztext(tmp_path, "ot")
    write_ztext(tmp_path / "empty", "ot", ["", "<milestone/>"])
    with pytest.raises(bible.BibleError, match="no verses"):
        bible.module_verses(tmp_path / "empty")


def test_chapter_start_capitals_get_their_usual_case():
    table = bible.case_table(["y fueron", "Jehová dijo y fueron", "Jehová"])
    fix = lambda t: bible.uncap_chapter_start(t, table)  # noqa: E731
    assert fix("EN el principio") == "En el principio"
    assert fix("Y FUERON acabados") == "Y fueron acabados"
    assert fix("Y JEHOVÁ dijo") == "Y Jehová dijo"
    assert fix("Salmo de David. ¡OH Jehová") == "Salmo de David. ¡Oh Jehová"
    assert fix("Y dijo") == "Y dijo"  # nothing in capitals
    verses = [Verse("Gen", 1, 1, "Y FUERON"), Verse("Gen", 1, 2, "Y FUERON")]
    assert [v.text for v in bible.fix_chapter_caps(verses)] == ["Y fueron", "Y FUERON"]


# ----------------------------------------------------------------------------- alignment


def test_align_joins_on_the_reference_over_the_shared_books():
    en = [Verse("Gen", 2, 1, "b"), Verse("Gen", 1, 1, "a"), Verse("Tob", 1, 1, "x"),
          Verse("Exod", 1, 1, "c"), Verse("Gen", 1, 2, "only English")]
    es = [Verse("Exod", 1, 1, "C"), Verse("Gen", 1, 1, "A"), Verse("Gen", 2, 1, "B"),
          Verse("Gen", 2, 2, "only Spanish")]
    pairs = bible.align(en, es)
    assert [(p.ref, p.source, p.target) for p in pairs] == [
        ("Gen.1.1", "a", "A"), ("Gen.2.1", "b", "B"), ("Exod.1.1", "c", "C")
    ]


def test_monotone_matches_follow_a_shift():
    rng = random.Random(0)
    src = [rng.randint(30, 300) for _ in range(40)]
    tgt = src[:10] + [120] + src[10:-1]  # one extra target verse at 10: the rest shift by one
    matches = bible.monotone_matches(src, tgt, mu=0.0, sigma=0.1)
    assert matches[:10] == [(i, i) for i in range(10)]
    assert matches[10:] == [(i, i + 1) for i in range(10, 39)]
    # An odd verse in line stays in line: no shift for a single bad length.
    odd = list(src)
    odd[20] = 5
    assert bible.monotone_matches(src, odd, mu=0.0, sigma=0.1) == [(i, i) for i in range(40)]


def test_monotone_matches_trust_references_over_weak_length_evidence():
    src, tgt = [100, 120] * 4, [120, 100] * 4  # shifted by one they fit exactly, in line 20% off
    keys = [f"v{i}" for i in range(8)]
    assert bible.monotone_matches(src, tgt, mu=0.0, sigma=0.1) == [(i, i + 1) for i in range(7)]
    with_keys = bible.monotone_matches(src, tgt, mu=0.0, sigma=0.1, src_keys=keys, tgt_keys=keys)
    assert with_keys == [(i, i) for i in range(8)]


def _chapter_verses(book: str, lens: list[int], lang: str) -> list[Verse]:
    word = "a" if lang == "en" else "b"
    return [Verse(book, 1, i + 1, word * n) for i, n in enumerate(lens)]


def test_filters_drop_shifted_verses_outliers_and_short_ones():
    rng = random.Random(1)
    lens = [rng.randint(40, 250) for _ in range(30)]
    en = _chapter_verses("Gen", lens, "en") + _chapter_verses("Exod", lens, "en")
    shifted = lens[:12] + [90] + lens[12:-1]  # Exodus: a verse more from 13 on, as Num 13
    es = _chapter_verses("Gen", lens, "es") + _chapter_verses("Exod", shifted, "es")
    es[5] = Verse("Gen", 1, 6, "b" * (lens[5] * 3))  # a length outlier in line
    es[15] = Verse("Gen", 1, 16, "b")
    pairs = bible.align(en, es)
    mu, sigma = bible.log_ratio_stats(pairs)
    assert abs(mu) < 1e-9
    refs = bible.consistent_refs(en, es, mu=mu, sigma=sigma)
    kept, dropped = bible.filter_pairs(pairs, keep_refs=refs)
    assert dropped == {"short": 1, "shifted": 18, "ratio": 1}
    kept_refs = {p.ref for p in kept}
    assert {f"Exod.1.{v}" for v in range(1, 13)} <= kept_refs
    assert not any(f"Exod.1.{v}" in kept_refs for v in range(13, 31))
    assert "Gen.1.6" not in kept_refs and "Gen.1.16" not in kept_refs
    assert len(kept) == 60 - 20


def test_length_ratio_filter_bounds():
    pairs = [Pair("Gen", 1, i, "x" * 100, "y" * n) for i, n in enumerate((50, 60, 100, 180, 200))]
    kept, dropped = bible.filter_pairs(pairs, min_ratio=0.6, max_ratio=1.8)
    assert [len(p.target) for p in kept] == [60, 100, 180]
    assert dropped == {"short": 0, "shifted": 0, "ratio": 2}


def test_split_of_is_stable_and_about_three_percent_each():
    assert bible.split_of("Gen.1.1") == bible.split_of("Gen.1.1")
    refs = [f"Ps.{c}.{v}" for c in range(1, 151) for v in range(1, 101)]
    counts = {s: 0 for s in bible.SPLITS}
    for ref in refs:
        counts[bible.split_of(ref)] += 1
    for split in ("validation", "test"):
        assert 0.025 < counts[split] / len(refs) < 0.04


# ----------------------------------------------------------------------------- whole build


def _deb(tmp: Path, package: str, module: str, entries: list[str]) -> None:
    root = tmp / package
    write_ztext(root / "usr/share/sword/modules/texts/ztext" / module, "ot", entries)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: test module\n"
    )
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(tmp / f"{package}_1.0-1_all.deb")],
        check=True, capture_output=True,
    )


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_build_from_deb_files_writes_verified_splits(tmp_path):
    debs = tmp_path / "debs"
    debs.mkdir()
    _deb(debs, bible.ENGLISH.package, bible.ENGLISH.module, ENGLISH_OT)
    _deb(debs, bible.SPANISH.package, bible.SPANISH.module, SPANISH_OT)
    meta = bible.build(tmp_path / "out", debs_dir=str(debs), log=lambda *_: None)
    assert meta["sources"]["en"]["version"] == "1.0-1"
    assert meta["pairs"]["aligned"] == 5  # Gen 1:1-3, 2:1, 3:1 (Tobit dropped, Gen 2:2 English-less)
    assert bible.verify(tmp_path / "out") == meta
    rows = sum(f["rows"] for f in meta["files"].values())
    assert rows == meta["pairs"]["kept"]
    train = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    gen11 = [r for r in train if (r["book"], r["chapter"], r["verse"]) == ("Gen", 1, 1)]
    if gen11:  # the split is a hash of the reference
        assert gen11[0]["target"] == "En el principio crió Dios los cielos y la tierra."
    assert bible.main(["check", "--out", str(tmp_path / "out")]) == 0


# ----------------------------------------------------------------------------- layout


def test_training_does_not_import_the_data_builders():
    """kdtw.prep (the Bible builder) runs under `kdtw data` only: training imports none of it."""
    code = (
        "import sys, kdtw.local, kdtw.factory, kdtw.phase1, kdtw.pretrain, kdtw.evaluation, kdtw.cli;"
        "print(sorted(m for m in sys.modules if m.startswith('kdtw.prep')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]

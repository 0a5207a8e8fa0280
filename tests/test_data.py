import json
import re
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from kdtw import data, dataset_sources, toy_tasks
from kdtw.dataset_sources import load_dataset_source
from kdtw.examples import SPLITS, DataError, Example, spread, spread_indices
from kdtw.tokenizer import build_word_tokenizer

WORD = re.compile(r"[a-z]+")
SMALL = dict(n_train=300, n_validation=50, n_test=50)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    # Keep `datasets` caches of the local test files out of ~/.cache.
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def translation():
    return toy_tasks.toy_translation()


@pytest.fixture(scope="module")
def summarisation():
    return toy_tasks.toy_summarisation()


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("gen", [toy_tasks.toy_translation, toy_tasks.toy_summarisation])
def test_same_seed_same_data_other_seed_other_data(gen):
    a, b, c = gen(seed=3, **SMALL), gen(seed=3, **SMALL), gen(seed=4, **SMALL)
    assert a == b
    for split in SPLITS:
        assert a[split] != c[split]


@pytest.mark.parametrize("gen", [toy_tasks.toy_translation, toy_tasks.toy_summarisation])
def test_split_sizes(gen):
    d = gen(seed=0, n_train=123, n_validation=7, n_test=0)
    assert set(d) == {"train", "validation", "test"}
    assert [len(d[s]) for s in SPLITS] == [123, 7, 0]
    assert all(isinstance(ex, Example) for ex in d["train"])


@pytest.mark.parametrize("gen", [toy_tasks.toy_translation, toy_tasks.toy_summarisation])
def test_splits_come_from_their_own_streams(gen):
    small, large = gen(seed=0, **SMALL), gen(seed=0, **{**SMALL, "n_train": 600})
    # Validation and test do not depend on how much train data was drawn ...
    assert small["validation"] == large["validation"]
    assert small["test"] == large["test"]
    assert small["train"] == large["train"][:300]
    # ... and are not copies of the train stream or of each other.
    assert small["validation"] != small["train"][:50]
    assert small["validation"] != small["test"]


def test_translation_source_determines_target(translation):
    seen: dict[str, str] = {}
    repeats = 0
    for ex in translation["train"] + translation["validation"] + translation["test"]:
        if ex.source in seen:
            repeats += 1
            assert seen[ex.source] == ex.target
        seen[ex.source] = ex.target
    assert repeats > 0  # the property was exercised


def test_translation_verb_comes_last_with_its_suffix_words(translation):
    # SOV: every target ends in verb, tense marker (3 values), agreement marker (2 values).
    ends = [ex.target.split()[-2:] for ex in translation["train"]]
    assert len({tense for tense, _ in ends}) == 3
    assert len({agree for _, agree in ends}) == 2


def test_translation_words_are_letters_and_languages_are_disjoint(translation):
    src_words, tgt_words = set(), set()
    for split in translation.values():
        for ex in split:
            for text, words in ((ex.source, src_words), (ex.target, tgt_words)):
                assert text == " ".join(text.split())
                assert all(WORD.fullmatch(w) for w in text.split()), text
                words.update(text.split())
    assert not src_words & tgt_words
    lengths = [len(ex.source.split()) for ex in translation["train"]]
    assert min(lengths) >= 4 and max(lengths) <= 14


def test_translation_rare_words_at_defaults(translation):
    share = toy_tasks.rare_token_share(
        translation["train"], translation["validation"], toy_tasks.content_words("toy_translation")
    )
    # Bounded by 20 * lexicon_size / train content tokens; see the toy_translation docstring.
    assert 0.05 <= share <= 0.2


def test_translation_rare_words_with_a_larger_lexicon():
    d = toy_tasks.toy_translation(lexicon_size=4000)
    words = toy_tasks.content_words("toy_translation", lexicon_size=4000)
    assert 0.18 <= toy_tasks.rare_token_share(d["train"], d["validation"], words) <= 0.40
    # Zipfian: the most frequent lemma is far more frequent than the median one.
    counts = Counter(w for ex in d["train"] for w in ex.target.split() if w in words)
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] > 20 * ranked[len(ranked) // 2]


def test_summarisation_shape_and_facts(summarisation):
    facts: dict[str, tuple[str, str]] = {}
    for ex in summarisation["train"] + summarisation["validation"]:
        doc, summary = ex.source.split(), ex.target.split()
        assert all(WORD.fullmatch(w) for w in doc + summary)
        assert len(doc) <= 40 and len(summary) <= 12
        # The summary: main entity (after "on <day>"), hidden facts, the key event copied.
        key = doc.index("on")
        main = doc[key + 2]
        assert summary[0] == main and summary[1] == "the" and summary[3] == "from"
        profession, town = summary[2], summary[4]
        assert town not in doc
        assert doc[key + 3 : key + 10] == summary[5:]
        assert facts.setdefault(main, (profession, town)) == (profession, town)
    assert len({p for p, _ in facts.values()}) > 10


def test_summarisation_rare_entities(summarisation):
    share = toy_tasks.rare_token_share(
        summarisation["train"],
        summarisation["validation"],
        toy_tasks.content_words("toy_summarisation"),
    )
    assert 0.1 <= share <= 0.4


def test_bad_knobs_raise_data_error():
    with pytest.raises(DataError, match="min_len"):
        toy_tasks.toy_translation(min_len=9, max_len=3, **SMALL)
    with pytest.raises(DataError, match="n_train"):
        toy_tasks.toy_summarisation(n_train=-1)
    with pytest.raises(DataError, match="lexicon_siz"):
        toy_tasks.task_vocabulary("toy_translation", lexicon_siz=10)
    with pytest.raises(DataError, match="toy_translation"):
        toy_tasks.task_vocabulary("nope")


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("kind", ["toy_translation", "toy_summarisation"])
def test_tokenizer_round_trips_every_validation_text(kind, translation, summarisation):
    splits = translation if kind == "toy_translation" else summarisation
    vocab = toy_tasks.task_vocabulary(kind)
    assert vocab == sorted(set(vocab))
    tok = build_word_tokenizer(vocab)
    assert len(tok) == len(vocab) + 4
    for ex in splits["validation"]:
        for text in (ex.source, ex.target):
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    words = {w for split in splits.values() for ex in split for t in (ex.source, ex.target)
             for w in t.split()}
    assert words <= set(vocab)


def test_tokenizer_specials_and_prompt_words():
    tok = build_word_tokenizer(["zeta", "alpha", "alpha", "use,", "With light:"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<pad>", "</s>", "<unk>", "<s>"]}
    assert ids == {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens(list(range(4, len(tok)))) == sorted(
        [",", ":", "With", "alpha", "light", "use", "zeta"]
    )
    prompt = "With light use, zeta:"
    ids = tok(prompt).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["With", "light", "use", ",", "zeta", ":"]
    assert tok.decode(ids) == "With light use , zeta :"
    assert tok("alpha omega").input_ids == [tok.convert_tokens_to_ids("alpha"), 2]


def test_tokenizer_adds_no_specials():
    tok = build_word_tokenizer(["a", "b"])
    for ids in (tok("a b").input_ids, tok(["b a"]).input_ids[0], tok.encode("a b")):
        assert not set(ids) & {0, 1, 2, 3}
        assert len(ids) == 2


def test_tokenizer_save_load_round_trip(tmp_path):
    vocab = toy_tasks.task_vocabulary("toy_summarisation", n_entities=50)
    tok = build_word_tokenizer(vocab + ["summarise:"])
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "summarise: " + " ".join(vocab[::7])
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.decode(loaded(text).input_ids) == tok.decode(tok(text).input_ids)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.bos_token_id) == (
        0, 1, 2, 3
    )


# ----------------------------------------------------------------------------- datasets sources

ROWS = [{"de": f"quelle {i}", "en": f"target {i}", "id": i} for i in range(5)]
COLS = dict(source_column="de", target_column="en")


def write_json(path, rows, lines=True):
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    return path


def write_csv(path, rows):
    with open(path, "w") as f:
        f.write("de,en,id\n")
        f.writelines(f"{r['de']},{r['en']},{r['id']}\n" for r in rows)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def expected(rows):
    return [Example(r["de"], r["en"]) for r in rows]


@pytest.mark.parametrize(
    "name, writer",
    [("d.jsonl", write_json), ("d.json", lambda p, r: write_json(p, r, lines=False)),
     ("d.csv", write_csv), ("d.parquet", write_parquet)],
)
def test_single_local_file_loads_as_train(tmp_path, name, writer):
    path = writer(tmp_path / name, ROWS)
    out = load_dataset_source(str(path), splits={"train": "train"}, **COLS)
    assert out == {"train": expected(ROWS)}


def test_data_files_map_splits_and_max_examples(tmp_path):
    write_csv(tmp_path / "tr.csv", ROWS)
    write_csv(tmp_path / "va.csv", ROWS[:2])
    out = load_dataset_source(
        str(tmp_path),
        data_files={"train": "tr.csv", "dev": "va.csv"},
        splits={"train": "train", "validation": "dev"},
        max_examples=3,
        **COLS,
    )
    # 3 of 5 spread over the split (rows 0, 1, 3), not its first three; a 2-row split stays whole
    assert out == {"train": expected([ROWS[0], ROWS[1], ROWS[3]]), "validation": expected(ROWS[:2])}


def test_load_splits_caps_each_split_once_for_both_task_kinds(tmp_path):
    """task.max_examples reaches a `datasets` source, which keeps N spread over each split, and
    caps a generated task's splits the same way (the factory applies it once per kind)."""
    from kdtw.config import load_config
    from kdtw.factory import load_splits

    rows = [{"de": f"quelle {i}", "en": f"target {i}", "id": i} for i in range(10)]
    write_parquet(tmp_path / "train.parquet", rows)
    write_parquet(tmp_path / "validation.parquet", rows[:4])
    cfg = load_config("conf/smollm2_bible_en_es.yaml", [
        f"task.dataset={tmp_path}", "task.source_column=de", "task.target_column=en",
        "task.data_files={train: train.parquet, validation: validation.parquet}",
        "task.splits={train: train, validation: validation}", "task.max_examples=3",
    ])
    out = load_splits(cfg)
    assert out == {"train": expected([rows[0], rows[3], rows[6]]), "validation": expected([rows[0], rows[1], rows[2]])}
    full = load_splits(load_config("conf/tiny.yaml"))
    capped = load_splits(load_config("conf/tiny.yaml", ["task.max_examples=3"]))
    assert capped == {k: spread(v, 3) for k, v in full.items()}


def test_spread_measures_every_part_of_a_split_in_canonical_order():
    """A split stored book by book (data/bible_en_es: its first 32 validation verses all come
    from Genesis 1-31) must not be judged by its first book: N examples are spread over it."""
    split = [f"{book} {i}" for book in ("Gen", "Exod", "Ps", "Matt") for i in range(250)]
    picked = spread(split, 32)
    assert len(picked) == 32 and len(set(picked)) == 32
    assert [sum(p.startswith(b + " ") for p in picked) for b in ("Gen", "Exod", "Ps", "Matt")] == [8, 8, 8, 8]
    assert picked == sorted(picked, key=split.index)  # split order kept
    assert spread(split, None) == split and spread(split, 5000) == split and spread(split, 0) == []
    for n in range(1, 40):  # distinct, in order, from the first example on
        idx = [split.index(p) for p in spread(split[:n + 7], n)]
        assert idx[0] == 0 and all(a < b for a, b in zip(idx, idx[1:]))
    with pytest.raises(ValueError, match="n=-1"):
        spread(split, -1)
    assert spread_indices(1000, 32) == [split.index(p) for p in picked]  # the datasets source's rule


def test_local_folder_with_split_files(tmp_path):
    write_parquet(tmp_path / "train.parquet", ROWS)
    write_parquet(tmp_path / "test.parquet", ROWS[3:])
    out = data.load_task(
        "datasets", path_or_name=str(tmp_path), splits={"train": "train", "test": "test"}, **COLS
    )
    assert out == {"train": expected(ROWS), "test": expected(ROWS[3:])}


def test_missing_column_names_it_and_the_config_key(tmp_path):
    path = write_json(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError) as e:
        load_dataset_source(
            str(path), source_column="src", target_column="en", splits={"train": "train"}
        )
    msg = str(e.value)
    assert "'src'" in msg and "task.source_column" in msg and "'de'" in msg
    with pytest.raises(DataError, match="task.target_column"):
        load_dataset_source(
            str(path), source_column="de", target_column="tgt", splits={"train": "train"}
        )


def test_missing_split_lists_available_ones(tmp_path):
    path = write_json(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match=r"'validation'.*\['train'\].*task.splits"):
        load_dataset_source(str(path), splits={"validation": "validation"}, **COLS)


def test_empty_split(tmp_path, monkeypatch):
    from datasets import Dataset

    # `datasets` cannot load an empty local split, but a hub dataset can have one.
    empty = Dataset.from_dict({"de": [], "en": []})
    monkeypatch.setattr(dataset_sources, "_load_raw", lambda *a: {"train": empty})
    with pytest.raises(DataError, match="split 'train' .* is empty"):
        load_dataset_source("owner/name", splits={"train": "train"}, **COLS)


def test_empty_local_files(tmp_path):
    # `datasets` fails on these with cryptic errors; ours say what is wrong.
    write_csv(tmp_path / "tr.csv", ROWS)
    write_csv(tmp_path / "va.csv", [])
    (tmp_path / "zero.csv").touch()
    splits = {"train": "train", "validation": "validation"}
    for files in ({"train": "tr.csv", "validation": "va.csv"}, {"train": "zero.csv"}):
        with pytest.raises(DataError, match="empty"):
            load_dataset_source(str(tmp_path), data_files=files, splits=splits, **COLS)


def test_saved_to_disk_folder(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS[:1])).save_to_disk(
        str(tmp_path)
    )
    out = load_dataset_source(str(tmp_path), splits={"train": "train", "test": "test"}, **COLS)
    assert out == {"train": expected(ROWS), "test": expected(ROWS[:1])}


def test_non_string_value_names_the_row(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["en"] = None
    path = write_json(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"row 2 .*'en'"):
        load_dataset_source(str(path), splits={"train": "train"}, **COLS)
    with pytest.raises(DataError, match=r"row 0 .*'id'"):
        load_dataset_source(
            str(path), source_column="id", target_column="en", splits={"train": "train"}
        )


def test_nonexistent_paths(tmp_path):
    for missing in (str(tmp_path / "nope.json"), "./nope/train.csv", "nope.parquet"):
        with pytest.raises(DataError, match="does not exist"):
            load_dataset_source(missing, splits={"train": "train"}, **COLS)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_source(
            str(tmp_path), data_files={"train": "nope.csv"}, splits={"train": "train"}, **COLS
        )


def test_load_task_dispatch():
    assert data.load_task("toy_translation", **SMALL) == toy_tasks.toy_translation(**SMALL)
    assert data.load_task("toy_summarisation", seed=2, **SMALL) == toy_tasks.toy_summarisation(
        seed=2, **SMALL
    )
    with pytest.raises(DataError, match="toy_translation.*toy_summarisation.*datasets"):
        data.load_task("wmt")
    with pytest.raises(DataError, match="n_entities"):
        data.load_task("toy_translation", n_entities=5)


def test_dotted_column_paths_select_a_field_of_a_mapping_column(tmp_path):
    import json

    f = tmp_path / "wmt.jsonl"
    f.write_text("\n".join(json.dumps({"translation": {"en": f"hi {i}", "de": f"hallo {i}"}}) for i in range(3)))
    splits = load_dataset_source(str(f), source_column="translation.en", target_column="translation.de",
                                 splits={"train": "train"})
    assert splits["train"][1] == Example("hi 1", "hallo 1")
    with pytest.raises(DataError, match="no field 'fr'"):
        load_dataset_source(str(f), source_column="translation.fr", target_column="translation.de",
                            splits={"train": "train"})


def test_a_broken_file_says_what_datasets_found(tmp_path):
    """`datasets` wraps a file's own error in a generic "An error occurred while generating the
    dataset": the message carries the cause (a JSON syntax error; split files whose columns differ)."""
    write_json(tmp_path / "tr.jsonl", ROWS)
    (tmp_path / "broken.jsonl").write_text('{"de": "a", "en": "b", "id": 9}\n{oops\n')
    write_json(tmp_path / "other.jsonl", [{"src": r["de"], "en": r["en"], "id": r["id"]} for r in ROWS])
    splits = {"train": "train", "validation": "validation"}
    for bad, why in (("broken.jsonl", "JSON parse error"), ("other.jsonl", "every split's file must have the same columns")):
        with pytest.raises(DataError, match=why):
            load_dataset_source(str(tmp_path), data_files={"train": "tr.jsonl", "validation": bad}, splits=splits, **COLS)

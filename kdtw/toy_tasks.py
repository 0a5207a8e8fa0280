"""The two generated tasks: (source, target) pairs made offline, deterministically from a seed
(pure Python, `random.Random`):

- `toy_translation`: a synthetic language pair. "Toy English" (real English function words,
  generated content words with English-like inflection) maps to a target language with SOV
  order, mirrored noun phrases, postpositions and separate suffix words for plural, tense and
  subject agreement. The target is a deterministic function of the source, and content words are
  drawn from a Zipf law, so a small model's errors fall on rare lemmas.
- `toy_summarisation`: short template documents about one main entity plus distractors, to a
  one-sentence summary that adds two hidden facts about that entity (profession, home town) that
  never appear in any document and must be memorised from training.

`task_vocabulary` lists every word a task can hold (for the word tokenizer), `content_words` the
target words whose rarity makes it hard, and `rare_token_share` how many of those are rare in train.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .examples import SPLITS, DataError, Example, Splits


# ----------------------------------------------------------------------------- helpers


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 0:
            raise DataError(f"{name}={value!r}: use an integer >= 0")


def _zipf_cum_weights(n: int, exponent: float) -> list[float]:
    """Cumulative weights of rank^-exponent for ranks 1..n (for `random.choices`)."""
    total, cum = 0.0, []
    for rank in range(1, n + 1):
        total += rank**-exponent
        cum.append(total)
    return cum


def _split_rng(task: str, seed: int, split: str) -> random.Random:
    # A str seed is hashed with SHA-512: stable across processes and PYTHONHASHSEED, and each
    # split gets its own stream, so validation/test never depend on n_train.
    return random.Random(f"kdtw/{task}/{seed}/{split}")


# Generated words must not spell anything offensive (a short, deliberately blunt list).
_BLOCKED = ("shit", "fuck", "cunt", "dick", "cock", "piss", "slut", "twat", "fag", "nig", "rape",
            "kike", "spic", "wank", "tit", "cum", "porn", "sex", "nazi", "hitler", "bitch")


def _make_words(
    rng: random.Random,
    n: int,
    *,
    onsets: Sequence[str],
    vowels: Sequence[str],
    codas: Sequence[str],
    syllables: tuple[int, int],
    taken: set[str],
    forms=lambda w: (w,),
) -> list[str]:
    """`n` new pronounceable words; a word is kept only if none of its `forms` is taken."""
    words: list[str] = []
    for _ in range(200 * n + 1000):
        if len(words) == n:
            return words
        k = rng.randint(*syllables)
        word = "".join(
            rng.choice(onsets) + rng.choice(vowels) + (rng.choice(codas) if i == k - 1 else "")
            for i in range(k)
        )
        word_forms = forms(word)
        if any(f in taken for f in word_forms) or len(set(word_forms)) != len(word_forms):
            continue
        if any(bad in word for bad in _BLOCKED):
            continue
        taken.update(word_forms)
        words.append(word)
    raise DataError(f"could not generate {n} distinct words; use a smaller lexicon size")


def bind_knobs(generator, kind: str, knobs: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's full keyword arguments (defaults filled in); unknown knobs are an error."""
    try:
        bound = inspect.signature(generator).bind(**knobs)
    except TypeError as e:
        names = [p for p in inspect.signature(generator).parameters]
        raise DataError(
            f"{kind}: {e}; the knobs (task.generator keys) are {names}"
        ) from None
    bound.apply_defaults()
    return dict(bound.arguments)


# ----------------------------------------------------------------------------- toy translation

# Closed classes of toy English. Content words are generated; these are fixed.
_DETS_SG = ("a", "the", "this", "that", "every")
_DETS_PL = ("the", "these", "those", "some", "many")
_SUBJECT_PRONOUNS = {"i": "sg", "he": "sg", "she": "sg", "it": "sg", "we": "pl", "they": "pl"}
_THIRD_PERSON_SG = {"he", "she", "it"}
_OBJECT_PRONOUNS = ("me", "him", "her", "us", "them")
_PREPOSITIONS = ("in", "on", "with", "near", "under", "behind", "from", "to")
_CONJUNCTION = "and"
_FUTURE_AUX = "will"
_FUNCTION_WORDS = tuple(
    dict.fromkeys(
        _DETS_SG + _DETS_PL + tuple(_SUBJECT_PRONOUNS) + _OBJECT_PRONOUNS + _PREPOSITIONS
        + (_CONJUNCTION, _FUTURE_AUX)
    )
)
# Target-side markers, written as separate words after the word they mark.
_MARKERS = ("plural", "past", "present", "future", "agree_sg", "agree_pl")
_TENSES = ("past", "present", "future")

_EN_ONSETS = (
    "b bl br c ch cl cr d dr f fl fr g gl gr h j k l m n p pl pr r s sh sk sl sp st t th tr v w"
).split()
_EN_VOWELS = "a e i o u ea oo ai ou".split()
_EN_CODAS = "_ n m t d k ck ng nd st r l p".split()
_EN_CODAS = ["" if c == "_" else c for c in _EN_CODAS]
_TG_ONSETS = "k m n p t l s r h y z".split()
_TG_VOWELS = "a e i o u".split()


def _noun_forms(lemma: str) -> tuple[str, ...]:
    return (lemma, lemma + "s")


def _verb_forms(lemma: str) -> tuple[str, ...]:
    return (lemma, lemma + "s", lemma + "ed")


@dataclass(frozen=True)
class _TranslationLexicon:
    nouns: tuple[str, ...]  # source lemmas, in Zipf rank order
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]
    to_target: dict[str, str]  # source lemma or function word -> target word (a bijection)
    markers: dict[str, str]  # marker name -> target word


@functools.lru_cache(maxsize=16)
def _translation_lexicon(seed: int, lexicon_size: int) -> _TranslationLexicon:
    if not isinstance(lexicon_size, int) or lexicon_size < 3:
        raise DataError(f"lexicon_size={lexicon_size!r}: use an integer >= 3")
    rng = _split_rng("toy_translation", seed, "lexicon")
    n_verbs = max(1, lexicon_size // 4)
    n_adjectives = max(1, lexicon_size // 4)
    n_nouns = lexicon_size - n_verbs - n_adjectives

    taken: set[str] = set(_FUNCTION_WORDS)
    english = dict(onsets=_EN_ONSETS, vowels=_EN_VOWELS, codas=_EN_CODAS, taken=taken)
    nouns = _make_words(rng, n_nouns, syllables=(1, 2), forms=_noun_forms, **english)
    verbs = _make_words(rng, n_verbs, syllables=(1, 2), forms=_verb_forms, **english)
    adjectives = _make_words(rng, n_adjectives, syllables=(1, 2), **english)

    # Target words: open syllables only (CV), so they look unlike the source.
    target = dict(onsets=_TG_ONSETS, vowels=_TG_VOWELS, codas=[""], taken=taken)
    marker_words = _make_words(rng, len(_MARKERS), syllables=(1, 1), **target)
    function_targets = _make_words(rng, len(_FUNCTION_WORDS), syllables=(1, 2), **target)
    content = nouns + verbs + adjectives
    content_targets = _make_words(rng, len(content), syllables=(2, 3), **target)

    to_target = dict(zip(_FUNCTION_WORDS, function_targets))
    to_target.update(zip(content, content_targets))
    return _TranslationLexicon(
        nouns=tuple(nouns),
        verbs=tuple(verbs),
        adjectives=tuple(adjectives),
        to_target=to_target,
        markers=dict(zip(_MARKERS, marker_words)),
    )


class _TranslationGrammar:
    """Samples one toy-English sentence and writes its translation alongside."""

    def __init__(self, lex: _TranslationLexicon, zipf_exponent: float):
        self.lex = lex
        self.cum = {
            cat: _zipf_cum_weights(len(words), zipf_exponent)
            for cat, words in (("n", lex.nouns), ("v", lex.verbs), ("a", lex.adjectives))
        }

    def _pick(self, rng: random.Random, cat: str, words: Sequence[str]) -> str:
        return rng.choices(words, cum_weights=self.cum[cat])[0]

    def noun_phrase(self, rng: random.Random) -> tuple[list[str], list[str], str]:
        """(source words, target words, number) for `det adj* noun`."""
        number = "pl" if rng.random() < 0.35 else "sg"
        det = rng.choice(_DETS_PL if number == "pl" else _DETS_SG)
        n_adj = rng.choices((0, 1, 2), weights=(0.5, 0.35, 0.15))[0]
        adjs = [self._pick(rng, "a", self.lex.adjectives) for _ in range(n_adj)]
        noun = self._pick(rng, "n", self.lex.nouns)
        t = self.lex.to_target
        src = [det, *adjs, noun + ("s" if number == "pl" else "")]
        # The target NP is the mirror image, the plural marker right after the noun.
        tgt = [t[noun]] + ([self.lex.markers["plural"]] if number == "pl" else [])
        tgt += [t[a] for a in reversed(adjs)] + [t[det]]
        return src, tgt, number

    def clause(self, rng: random.Random) -> tuple[list[str], list[str]]:
        t = self.lex.to_target
        if rng.random() < 0.25:
            pronoun = rng.choice(list(_SUBJECT_PRONOUNS))
            subj_src, subj_tgt, number = [pronoun], [t[pronoun]], _SUBJECT_PRONOUNS[pronoun]
            third_sg = pronoun in _THIRD_PERSON_SG
        else:
            subj_src, subj_tgt, number = self.noun_phrase(rng)
            third_sg = number == "sg"

        verb = self._pick(rng, "v", self.lex.verbs)
        tense = rng.choice(_TENSES)
        if tense == "past":
            verb_src = [verb + "ed"]
        elif tense == "future":
            verb_src = [_FUTURE_AUX, verb]
        else:
            verb_src = [verb + ("s" if third_sg else "")]
        verb_tgt = [t[verb], self.lex.markers[tense], self.lex.markers["agree_" + number]]

        obj_src: list[str] = []
        obj_tgt: list[str] = []
        if rng.random() < 0.6:
            if rng.random() < 0.15:
                pronoun = rng.choice(_OBJECT_PRONOUNS)
                obj_src, obj_tgt = [pronoun], [t[pronoun]]
            else:
                obj_src, obj_tgt, _ = self.noun_phrase(rng)

        pp_src: list[str] = []
        pp_tgt: list[str] = []
        if rng.random() < 0.4:
            prep = rng.choice(_PREPOSITIONS)
            np_src, np_tgt, _ = self.noun_phrase(rng)
            pp_src, pp_tgt = [prep, *np_src], [*np_tgt, t[prep]]  # postposition

        # Source SVO + PP; target S PP O V (verb last, then its suffix words).
        return subj_src + verb_src + obj_src + pp_src, subj_tgt + pp_tgt + obj_tgt + verb_tgt

    def sentence(self, rng: random.Random) -> Example:
        src, tgt = self.clause(rng)
        if rng.random() < 0.15:
            src2, tgt2 = self.clause(rng)
            c = _CONJUNCTION
            src, tgt = src + [c] + src2, tgt + [self.lex.to_target[c]] + tgt2
        return Example(" ".join(src), " ".join(tgt))


def _sample_split(sample, rng: random.Random, n: int, min_len: int, max_len: int) -> list[Example]:
    out: list[Example] = []
    misses = 0
    while len(out) < n:
        ex = sample(rng)
        if min_len <= ex.source.count(" ") + 1 <= max_len:
            out.append(ex)
            misses = 0
        else:
            misses += 1
            if misses > 10_000:
                raise DataError(
                    f"no sentence of {min_len}..{max_len} source words in 10000 tries; "
                    "widen min_len/max_len (e.g. min_len=4, max_len=14)"
                )
    return out


@functools.lru_cache(maxsize=8)
def _toy_translation(
    seed, n_train, n_validation, n_test, lexicon_size, zipf_exponent, min_len, max_len
) -> tuple[tuple[Example, ...], ...]:
    _check_sizes(n_train=n_train, n_validation=n_validation, n_test=n_test)
    if not (1 <= min_len <= max_len):
        raise DataError(f"min_len={min_len}, max_len={max_len}: need 1 <= min_len <= max_len")
    if zipf_exponent < 0:
        raise DataError(f"zipf_exponent={zipf_exponent}: use a value >= 0 (1.1 is typical)")
    grammar = _TranslationGrammar(_translation_lexicon(seed, lexicon_size), zipf_exponent)
    sizes = (n_train, n_validation, n_test)
    return tuple(
        tuple(_sample_split(grammar.sentence, _split_rng("toy_translation", seed, split), n,
                            min_len, max_len))
        for split, n in zip(SPLITS, sizes)
    )


def toy_translation(
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_validation: int = 200,
    n_test: int = 200,
    lexicon_size: int = 1200,
    zipf_exponent: float = 1.1,
    min_len: int = 4,
    max_len: int = 14,
) -> Splits:
    """Toy English -> a generated SOV language; {"train", "validation", "test"} of `Example`s.

    `lexicon_size` content lemmas (1/2 nouns, 1/4 verbs, 1/4 adjectives), each drawn with
    probability ∝ rank^-zipf_exponent within its category. The source determines the target.
    Each split comes from its own random stream, so the same seed gives identical data and
    validation/test do not change with n_train. Source lengths lie in [min_len, max_len] words.

    The share of validation content tokens whose lemma occurs <= 20 times in train cannot
    exceed 20 * lexicon_size / (content tokens in train, about 4.3 per sentence), and a Zipf
    law stays well under that bound: at the defaults it is about 9%; lexicon_size=3000 gives
    about 19% and 4000 about 21% (measured with `rare_token_share`).
    """
    splits = _toy_translation(
        seed, n_train, n_validation, n_test, lexicon_size, zipf_exponent, min_len, max_len
    )
    return {name: list(examples) for name, examples in zip(SPLITS, splits)}


def _translation_vocabulary(*, seed: int, lexicon_size: int, **_: Any) -> set[str]:
    lex = _translation_lexicon(seed, lexicon_size)
    words = set(_FUNCTION_WORDS) | set(lex.to_target.values()) | set(lex.markers.values())
    words |= set(lex.adjectives)
    for noun in lex.nouns:
        words.update(_noun_forms(noun))
    for verb in lex.verbs:
        words.update(_verb_forms(verb))
    return words


# ----------------------------------------------------------------------------- toy summarisation

_PROFESSIONS = (
    "baker farmer painter doctor teacher sailor singer tailor miner pilot judge nurse poet "
    "potter weaver hunter builder writer dancer fisher cook guard clerk smith"
).split()
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
_EVENT_VERBS = "found bought sold painted lost built stole fixed carried hid opened won".split()
_EVENT_ADJECTIVES = "red dusty small large broken golden green heavy strange new".split()
_EVENT_OBJECTS = "boat lamp horse map letter clock drum key ring cart bell coat".split()
_VENUES = "market river harbour school forest garden station library bridge temple".split()
_WEATHER = "cold warm wet dry windy".split()
_MOODS = "happy tired proud calm".split()
_N_TOWNS = 40

# Distractor sentences. {main}/{other} are entity names. "on" and "at" occur only in the key
# sentence, so the key event (and with it the main entity) is found by the word "on".
_DISTRACTORS = (
    "{other} also {verb} a {adj} {obj}",
    "{main} met {other} near the {venue}",
    "{other} said the {obj} looked {adj}",
    "the weather was {weather}",
    "many people came to watch",
    "{main} was very {mood}",
)
_KEY = "on {day} {main} {verb} a {adj} {obj} at the {venue}"
_SUMMARY = "{main} the {profession} from {town} {verb} a {adj} {obj} at the {venue}"


def _template_words() -> set[str]:
    fixed = set(_PROFESSIONS + _DAYS + _EVENT_VERBS + _EVENT_ADJECTIVES + _EVENT_OBJECTS)
    fixed |= set(_VENUES + _WEATHER + _MOODS)
    for template in _DISTRACTORS + (_KEY, _SUMMARY):
        fixed |= {w for w in template.split() if not w.startswith("{")}
    return fixed


@dataclass(frozen=True)
class _World:
    names: tuple[str, ...]  # entities, in Zipf rank order
    profession: dict[str, str]  # hidden facts: never in a document
    town: dict[str, str]
    towns: tuple[str, ...]


@functools.lru_cache(maxsize=16)
def _summarisation_world(seed: int, n_entities: int) -> _World:
    if not isinstance(n_entities, int) or n_entities < 2:
        raise DataError(f"n_entities={n_entities!r}: use an integer >= 2")
    rng = _split_rng("toy_summarisation", seed, "world")
    taken = _template_words()
    sounds = dict(onsets=_TG_ONSETS + ["b", "d", "v", "g"], vowels=_TG_VOWELS, taken=taken)
    towns = _make_words(rng, _N_TOWNS, codas=["n", "m", "l", "r"], syllables=(2, 3), **sounds)
    names = _make_words(rng, n_entities, codas=["", "n", "s"], syllables=(2, 3), **sounds)
    return _World(
        names=tuple(names),
        profession={n: rng.choice(_PROFESSIONS) for n in names},
        town={n: rng.choice(towns) for n in names},
        towns=tuple(towns),
    )


def _summarisation_example(world: _World, cum: list[float], rng: random.Random) -> Example:
    main = rng.choices(world.names, cum_weights=cum)[0]

    def other() -> str:
        while (name := rng.choices(world.names, cum_weights=cum)[0]) == main:
            pass
        return name

    event = dict(
        main=main,
        verb=rng.choice(_EVENT_VERBS),
        adj=rng.choice(_EVENT_ADJECTIVES),
        obj=rng.choice(_EVENT_OBJECTS),
        venue=rng.choice(_VENUES),
    )
    sentences = [_KEY.format(day=rng.choice(_DAYS), **event)]
    for template in rng.sample(_DISTRACTORS, rng.randint(2, 4)):
        sentences.append(
            template.format(
                main=main,
                other=other(),
                verb=rng.choice(_EVENT_VERBS),
                adj=rng.choice(_EVENT_ADJECTIVES),
                obj=rng.choice(_EVENT_OBJECTS),
                venue=rng.choice(_VENUES),
                weather=rng.choice(_WEATHER),
                mood=rng.choice(_MOODS),
            )
        )
    rng.shuffle(sentences)
    summary = _SUMMARY.format(profession=world.profession[main], town=world.town[main], **event)
    return Example(" ".join(sentences), summary)


@functools.lru_cache(maxsize=8)
def _toy_summarisation(
    seed, n_train, n_validation, n_test, n_entities, zipf_exponent
) -> tuple[tuple[Example, ...], ...]:
    _check_sizes(n_train=n_train, n_validation=n_validation, n_test=n_test)
    if zipf_exponent < 0:
        raise DataError(f"zipf_exponent={zipf_exponent}: use a value >= 0 (1.1 is typical)")
    world = _summarisation_world(seed, n_entities)
    cum = _zipf_cum_weights(n_entities, zipf_exponent)
    out = []
    for split, n in zip(SPLITS, (n_train, n_validation, n_test)):
        rng = _split_rng("toy_summarisation", seed, split)
        out.append(tuple(_summarisation_example(world, cum, rng) for _ in range(n)))
    return tuple(out)


def toy_summarisation(
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_validation: int = 200,
    n_test: int = 200,
    n_entities: int = 800,
    zipf_exponent: float = 1.1,
) -> Splits:
    """Template documents -> one-sentence summaries; scored with ROUGE-2.

    A document is 3-5 sentences in shuffled order: the key event ("on <day> <main> <verb> a
    <adj> <object> at the <venue>") and 2-4 distractors, some about other entities; at most 34
    words. The summary ("<main> the <profession> from <town> <verb> a <adj> <object> at the
    <venue>", 12 words) copies the key event and adds the main entity's profession and home town,
    fixed per entity by the seed and never written in a document: facts to memorise from
    train. Entities (generated names) are drawn with probability ∝ rank^-zipf_exponent, so about
    a fifth of validation summaries are about an entity seen <= 20 times in train.
    """
    splits = _toy_summarisation(seed, n_train, n_validation, n_test, n_entities, zipf_exponent)
    return {name: list(examples) for name, examples in zip(SPLITS, splits)}


def _summarisation_vocabulary(*, seed: int, n_entities: int, **_: Any) -> set[str]:
    world = _summarisation_world(seed, n_entities)
    return _template_words() | set(world.names) | set(world.towns)


# ----------------------------------------------------------------------------- task vocabulary

GENERATORS = {"toy_translation": toy_translation, "toy_summarisation": toy_summarisation}


def _generator(kind: str):
    if kind not in GENERATORS:
        raise DataError(f"kind={kind!r} is not a generated task; use one of {list(GENERATORS)}")
    return GENERATORS[kind]


def task_vocabulary(kind: str, **knobs: Any) -> list[str]:
    """Every word that can occur in any source or target of a generated task, sorted.

    Takes the generator's knobs (those that do not shape the lexicon are ignored), so a
    word-level tokenizer built from it never produces <unk> on the task.
    """
    args = bind_knobs(_generator(kind), kind, knobs)
    if kind == "toy_translation":
        return sorted(_translation_vocabulary(**args))
    return sorted(_summarisation_vocabulary(**args))


def content_words(kind: str, **knobs: Any) -> frozenset[str]:
    """Target-side words whose rarity makes the task hard for a small model.

    toy_translation: the target content lemmas (nouns, verbs, adjectives). toy_summarisation:
    the entity names (one per summary, and the key to the entity's memorised facts).
    """
    args = bind_knobs(_generator(kind), kind, knobs)
    if kind == "toy_translation":
        lex = _translation_lexicon(args["seed"], args["lexicon_size"])
        return frozenset(lex.to_target[w] for w in lex.nouns + lex.verbs + lex.adjectives)
    return frozenset(_summarisation_world(args["seed"], args["n_entities"]).names)


def rare_token_share(
    train: Sequence[Example],
    evaluation: Sequence[Example],
    words: Collection[str],
    *,
    max_count: int = 20,
) -> float:
    """Share of `words` tokens in the evaluation targets that occur <= max_count times in the
    train targets."""
    words = set(words)
    counts = Counter(w for ex in train for w in ex.target.split() if w in words)
    tokens = [w for ex in evaluation for w in ex.target.split() if w in words]
    if not tokens:
        raise DataError("no tokens of the given words in the evaluation targets")
    return sum(counts[w] <= max_count for w in tokens) / len(tokens)

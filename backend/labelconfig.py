"""Label config: a Label Studio labeling-config XML in, the `RankingSchema` the loop needs out.

Five ranking formats are recognised, from the tags alone (the tag and field names are the user's):

- "ranker":    <Ranker toName=L> over <List name=L value="$answers">: a full order, best first.
- "buckets":   the same Ranker with <Bucket> children: better buckets first, same bucket = tie.
- "pairwise":  <Pairwise toName="a,b"> over two <Text value="$field">: left or right wins.
- "rating":    a <Rating toName=t> over each candidate <Text name=t>: the rating gap is the margin.
- "best_of_n": <Choices> whose <Choice>s name the candidate <Text>s: the pick beats all the others.

The first of these a config contains decides (a Ranker config may carry other Choices, e.g. a
safety flag). Candidates always live in the task's `candidates_field` list of
{id, title, body, policy_version}; the formats that show candidates as separate <Text> tags
("slots") also get each candidate's body in the slot's own field, written by `candidate_data`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

RANKER, BUCKETS, PAIRWISE, RATING, BEST_OF_N = "ranker", "buckets", "pairwise", "rating", "best_of_n"
# Where the flat formats keep the candidate records (ids, policy versions) beside the shown text:
# no tag names this field, so it is fixed. Label Studio keeps task data keys that no tag shows.
FLAT_CANDIDATES_FIELD = "answers"
TEXT_TAGS = ("Text", "HyperText", "Paragraphs")


class LabelConfigError(ValueError):
    """The project's labeling config cannot drive the loop; the message says what to add."""


@dataclass(frozen=True)
class Slot:
    """A candidate shown by a tag of its own: the i-th slot shows the i-th item of the candidate list."""

    name: str  # the object tag's name, e.g. "answer1" (what Pairwise/Rating point at)
    field: str  # task data key of its text, e.g. "answer1" for value="$answer1"
    rating_name: str = ""  # the <Rating> over this slot (rating format)
    max_rating: int = 0  # that Rating's maxRating (Label Studio's default is 5)


@dataclass(frozen=True)
class RankingSchema:
    prompt_field: str  # task data key of the prompt, e.g. "prompt" for <Text value="$prompt">
    candidates_field: str  # task data key of the candidate list, e.g. "answers" for <List value="$answers">
    list_name: str = ""  # name of the <List> tag (the Ranker's toName); ranker formats only
    ranker_name: str = ""  # name of the <Ranker> tag (from_name of results and predictions); ranker formats only
    buckets: tuple[str, ...] = ()  # ordered <Bucket> names, best first; empty for a plain ranking
    kind: str = RANKER  # one of RANKER, BUCKETS, PAIRWISE, RATING, BEST_OF_N
    control_name: str = ""  # name of the <Pairwise> or <Choices> tag (from_name of its results)
    slots: tuple[Slot, ...] = ()  # flat formats: candidate tags in order (pairwise: left, right)
    choices: tuple[tuple[str, str | None], ...] = ()  # best_of_n: (choice key, slot name or None = no preference)

    @property
    def max_candidates(self) -> int | None:
        """How many candidates the config can show: None for a <List>, else one per slot."""
        return len(self.slots) if self.slots else None

    def candidate_items(self, data: dict) -> list[dict]:
        """The candidate records in a task's data; anything that is not a list of objects counts as none."""
        items = data.get(self.candidates_field)
        return [c for c in items if isinstance(c, dict)] if isinstance(items, list) else []

    def candidate_data(self, items: list[dict]) -> dict:
        """Task data fields that show `items` ({id, title, body, policy_version}): the list plus each slot's text.

        `candidate_data([])` gives the empty placeholders Label Studio requires on import.
        """
        data: dict = {self.candidates_field: items}
        for i, slot in enumerate(self.slots):
            data[slot.field] = str(items[i].get("body", "")) if i < len(items) else ""
        return data


def _field(tag: ET.Element) -> str:
    value = tag.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<{tag.tag} name={tag.get('name')!r}> needs value=\"$field\", got value={value!r}")
    return value[1:]


def _prompt_field(root: ET.Element, exclude: set[str]) -> str:
    prompt_tags = [t for t in root.iter() if t.tag in TEXT_TAGS and t.get("value") and t.get("name") not in exclude]
    if not prompt_tags:
        raise LabelConfigError('label config has no <Text value="$prompt"> showing the prompt: add one')
    return _field(prompt_tags[0])


def _ranker_schema(root: ET.Element, ranker: ET.Element, candidate_list: ET.Element) -> RankingSchema:
    buckets = tuple(b.get("name", "") for b in ranker.iter("Bucket"))
    return RankingSchema(
        prompt_field=_prompt_field(root, set()),
        candidates_field=_field(candidate_list),
        list_name=candidate_list.get("name", ""),
        ranker_name=ranker.get("name", ""),
        buckets=buckets,
        kind=BUCKETS if buckets else RANKER,
    )


def _slot(texts: dict[str, ET.Element], name: str, control: ET.Element) -> Slot:
    if name not in texts:
        raise LabelConfigError(
            f"<{control.tag} name={control.get('name')!r}> points at {name!r}, which is not a <Text value=\"$field\">")
    return Slot(name=name, field=_field(texts[name]))


def _pairwise_schema(root: ET.Element, pairwise: ET.Element, texts: dict[str, ET.Element]) -> RankingSchema:
    names = [n.strip() for n in pairwise.get("toName", "").split(",") if n.strip()]
    if len(names) != 2:
        raise LabelConfigError(f"<Pairwise toName=...> must name exactly two <Text> tags, got {names}")
    slots = tuple(_slot(texts, n, pairwise) for n in names)
    return RankingSchema(prompt_field=_prompt_field(root, set(names)), candidates_field=FLAT_CANDIDATES_FIELD,
                         kind=PAIRWISE, control_name=pairwise.get("name", ""), slots=slots)


def _rating_schema(root: ET.Element, ratings: list[ET.Element], texts: dict[str, ET.Element]) -> RankingSchema:
    slots = []
    for rating in ratings:
        slot = _slot(texts, rating.get("toName", ""), rating)
        max_rating = rating.get("maxRating", "5")
        if not max_rating.isdigit() or int(max_rating) < 2:
            raise LabelConfigError(
                f"<Rating name={rating.get('name')!r}> needs maxRating of 2 or more, got {max_rating!r}")
        slots.append(Slot(slot.name, slot.field, rating.get("name", ""), int(max_rating)))
    names = {s.name for s in slots}
    return RankingSchema(prompt_field=_prompt_field(root, names), candidates_field=FLAT_CANDIDATES_FIELD,
                         kind=RATING, slots=tuple(slots))


def _best_of_n_schema(choices: ET.Element, text_tags: list[ET.Element]) -> RankingSchema | None:
    """Choices over candidates: the first text tag is the prompt, the others are candidates.

    A choice names its candidate by value (or alias, which Label Studio writes into results instead)
    equal to the candidate tag's name or field. If none does (e.g. "A", "B", "tie"), choices map to
    candidates by position, and choices past the last candidate mean "no preference".
    """
    slots = tuple(Slot(name=t.get("name", ""), field=_field(t)) for t in text_tags[1:])
    if len(slots) < 2:
        return None
    keys = [c.get("alias") or c.get("value", "") for c in choices.iter("Choice")]
    by_name = {key: slot.name for slot in slots for key in (slot.name, slot.field)}
    if any(k in by_name for k in keys):
        targets = [by_name.get(k) for k in keys]
    else:
        targets = [slots[i].name if i < len(slots) else None for i in range(len(keys))]
    # Label Studio writes the alias into results when there is one; the shown value is accepted too
    # (results imported or written by hand often use it), both meaning the same candidate.
    mapping = tuple(sorted({key: target for c, target in zip(choices.iter("Choice"), targets)
                            for key in (c.get("value"), c.get("alias")) if key}.items()))
    return RankingSchema(prompt_field=_field(text_tags[0]), candidates_field=FLAT_CANDIDATES_FIELD,
                         kind=BEST_OF_N, control_name=choices.get("name", ""), slots=slots, choices=mapping)


def parse_ranking_schema(xml: str) -> RankingSchema:
    """Which ranking format a label config uses, and the tags and task fields it uses for it."""
    if not isinstance(xml, str):
        raise LabelConfigError(f"label config must be an XML string, got {type(xml).__name__}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from None
    lists = {tag.get("name"): tag for tag in root.iter("List")}
    rankers = [tag for tag in root.iter("Ranker") if tag.get("toName") in lists]
    if rankers:
        return _ranker_schema(root, rankers[0], lists[rankers[0].get("toName")])
    text_tags = [t for t in root.iter() if t.tag in TEXT_TAGS and t.get("value")]
    texts = {t.get("name"): t for t in text_tags}
    pairwise = next(root.iter("Pairwise"), None)
    if pairwise is not None:
        return _pairwise_schema(root, pairwise, texts)
    ratings = [r for r in root.iter("Rating") if r.get("toName") in texts]
    if len(ratings) >= 2:
        return _rating_schema(root, ratings, texts)
    for choices in root.iter("Choices"):
        schema = _best_of_n_schema(choices, text_tags)
        if schema is not None:
            return schema
    raise LabelConfigError(
        'label config has no <Ranker toName="..."> over a <List value="$answers">, no <Pairwise>, no <Rating> per '
        "candidate and no <Choices> over two or more candidate <Text>s: start from templates/ranker.xml "
        "(or ranker_buckets.xml, pairwise.xml, rating.xml, best_of_n.xml)"
    )

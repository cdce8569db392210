"""Label config: a Label Studio labeling-config XML in, the `RankingSchema` the loop needs out.

The tag names are the user's: the schema says which task field holds the prompt, which
holds the candidate list, and which control tag ranks it, so nothing else hard-codes names.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass


class LabelConfigError(ValueError):
    """The project's labeling config cannot drive the loop; the message says what to add."""


@dataclass(frozen=True)
class RankingSchema:
    prompt_field: str  # task data key of the prompt, e.g. "prompt" for <Text value="$prompt">
    candidates_field: str  # task data key of the candidate list, e.g. "answers" for <List value="$answers">
    list_name: str  # name of the <List> tag (the Ranker's toName)
    ranker_name: str  # name of the <Ranker> tag (from_name of results and predictions)
    buckets: tuple[str, ...] = ()  # ordered <Bucket> names, best first; empty for a plain ranking


def _field(tag: ET.Element) -> str:
    value = tag.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<{tag.tag} name={tag.get('name')!r}> needs value=\"$field\", got value={value!r}")
    return value[1:]


def parse_ranking_schema(xml: str) -> RankingSchema:
    """Read the prompt field, the candidate list and the Ranker that orders it from a label config."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from None
    lists = {tag.get("name"): tag for tag in root.iter("List")}
    rankers = [tag for tag in root.iter("Ranker") if tag.get("toName") in lists]
    if not rankers:
        raise LabelConfigError(
            'label config has no <Ranker toName="..."> over a <List value="$answers">: start from templates/ranker.xml'
        )
    ranker = rankers[0]
    candidate_list = lists[ranker.get("toName")]
    prompt_tags = [tag for tag in root.iter() if tag.tag in ("Text", "HyperText", "Paragraphs") and tag.get("value")]
    if not prompt_tags:
        raise LabelConfigError('label config has no <Text value="$prompt"> showing the prompt: add one')
    return RankingSchema(
        prompt_field=_field(prompt_tags[0]),
        candidates_field=_field(candidate_list),
        list_name=candidate_list.get("name", ""),
        ranker_name=ranker.get("name", ""),
        buckets=tuple(b.get("name", "") for b in ranker.iter("Bucket")),
    )

"""Every template is a Label Studio config the backend reads, and Label Studio accepts it with its sample tasks."""

import json
from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labelconfig import BEST_OF_N, BUCKETS, PAIRWISE, RANKER, RATING, parse_ranking_schema
from backend.preferences import annotation_pairs

pytestmark = pytest.mark.labelstudio

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
KINDS = {"ranker": RANKER, "ranker_buckets": BUCKETS, "pairwise": PAIRWISE, "best_of_n": BEST_OF_N, "rating": RATING}
# One result per template as the Label Studio editor writes it (shapes from shared/label-studio/README.md)
RESULTS = {
    "ranker": [{"from_name": "rank", "to_name": "answers", "type": "ranker",
                "value": {"ranker": {"rank": ["c1", "c0", "c2", "c3"]}}}],
    "ranker_buckets": [{"from_name": "rank", "to_name": "answers", "type": "ranker",
                        "value": {"ranker": {"good": ["c1"], "acceptable": ["c0", "c2"], "bad": ["c3"], "_": []}}}],
    "pairwise": [{"from_name": "pw", "to_name": "pw", "type": "pairwise", "value": {"selected": "right"}}],
    "best_of_n": [{"from_name": "best", "to_name": "prompt", "type": "choices", "value": {"choices": ["answer2"]}}],
    "rating": [{"from_name": f"rating{i + 1}", "to_name": f"answer{i + 1}", "type": "rating",
                "value": {"rating": r}} for i, r in enumerate([3, 5, 1])],
}
EXPECTED_PAIRS = {"ranker": 6, "ranker_buckets": 5, "pairwise": 1, "best_of_n": 3, "rating": 3}


def template(name: str) -> tuple[str, list[dict]]:
    return (TEMPLATES / f"{name}.xml").read_text(), json.loads((TEMPLATES / f"{name}.sample.json").read_text())


@pytest.mark.parametrize("name", sorted(KINDS))
def test_template_passes_the_sdk_label_interface_checks_with_its_samples(name):
    config, tasks = template(name)
    interface = LabelInterface(config)
    interface.validate()  # raises on a schema, name or toName error
    assert all(interface.validate_task(task) for task in tasks)
    assert not interface.validate_task({"data": {"prompt": "a prompt without candidate fields"}})


@pytest.mark.parametrize("name", sorted(KINDS))
def test_template_is_read_as_its_format_and_its_editor_result_gives_pairs(name):
    config, tasks = template(name)
    schema = parse_ranking_schema(config)
    assert schema.kind == KINDS[name]
    annotation = {"id": 1, "completed_by": 1, "result": RESULTS[name]}
    pairs = annotation_pairs(annotation, {"id": 1, **tasks[0]}, schema, project_id=1)
    assert len(pairs) == EXPECTED_PAIRS[name]
    assert all(p.chosen_policy_version == 0 and p.chosen != p.rejected for p in pairs)


def test_placeholder_sample_task_gives_the_empty_fields_the_backend_fills():
    for name in KINDS:
        config, tasks = template(name)
        schema = parse_ranking_schema(config)
        assert tasks[-1]["data"] == {schema.prompt_field: tasks[-1]["data"][schema.prompt_field],
                                     **schema.candidate_data([])}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_label_studio_accepts_template_and_imports_its_samples(ls_client, name):
    config, tasks = template(name)
    project = ls_client.projects.create(title=f"template {name}", label_config=config)
    try:
        response = ls_client.projects.import_tasks(id=project.id, request=tasks, return_task_ids=True)
        assert len(response.task_ids) == len(tasks)
        stored = ls_client.projects.get(id=project.id).label_config
        assert parse_ranking_schema(stored).kind == KINDS[name]
    finally:
        ls_client.projects.delete(id=project.id)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_label_studio_stores_the_editor_result_of_each_template(ls_client, name):
    config, tasks = template(name)
    project = ls_client.projects.create(title=f"result {name}", label_config=config)
    try:
        task_id = ls_client.projects.import_tasks(id=project.id, request=tasks[:1], return_task_ids=True).task_ids[0]
        annotation = ls_client.annotations.create(id=task_id, result=RESULTS[name], lead_time=1.0)
        task = ls_client.tasks.get(id=task_id)
        stored = ls_client.annotations.get(id=annotation.id)
        pairs = annotation_pairs(stored.model_dump(), {"id": task_id, "data": task.data}, parse_ranking_schema(config),
                                 project.id)
        assert len(pairs) == EXPECTED_PAIRS[name]
    finally:
        ls_client.projects.delete(id=project.id)

"""every project its own loop: model versions belong to a project's lineage, events to a project

Versions published before this have no project (NULL): they stay the common ancestry of every project,
whose own versions continue their numbering.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# 0001 left the (kind, version) constraint unnamed: SQLite's batch mode finds it by this convention,
# PostgreSQL named it itself
SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}


def _old_unique_name() -> str:
    return "uq_model_versions_kind_version" if op.get_bind().dialect.name == "sqlite" else "model_versions_kind_version_key"


def upgrade() -> None:
    with op.batch_alter_table("model_versions", naming_convention=SQLITE_NAMES) as batch:
        batch.drop_constraint(_old_unique_name(), type_="unique")
        batch.add_column(sa.Column("project_id", sa.Integer(), nullable=True))
        batch.create_index("ix_model_versions_project_id", ["project_id"])
        batch.create_unique_constraint("uq_model_versions_project_kind_version", ["project_id", "kind", "version"])
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("project_id", sa.Integer(), nullable=True))
        batch.create_index("ix_events_project_id", ["project_id"])


def downgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_project_id")
        batch.drop_column("project_id")
    with op.batch_alter_table("model_versions", naming_convention=SQLITE_NAMES) as batch:
        batch.drop_constraint("uq_model_versions_project_kind_version", type_="unique")
        batch.drop_index("ix_model_versions_project_id")
        batch.drop_column("project_id")
        batch.create_unique_constraint(_old_unique_name(), ["kind", "version"])

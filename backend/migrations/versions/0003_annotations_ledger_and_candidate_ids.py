"""annotations ledger and candidate ids

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('annotations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=True),
    sa.Column('task_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('refused', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_annotations_project_id'), ['project_id'], unique=False)

    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('chosen_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('rejected_id', sa.String(length=64), nullable=True))
    # annotations stored before the ledger existed become its records, so a sync can still drop them
    op.execute("INSERT INTO annotations (id, project_id, task_id, fingerprint, deleted) "
               "SELECT annotation_id, MIN(project_id), MIN(task_id), '', false FROM preference_pairs "
               "GROUP BY annotation_id")



def downgrade() -> None:
    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        batch_op.drop_column('rejected_id')
        batch_op.drop_column('chosen_id')

    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_annotations_project_id'))

    op.drop_table('annotations')

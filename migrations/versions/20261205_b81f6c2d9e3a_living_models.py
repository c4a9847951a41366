"""living models: serving generation, default threshold, version records, events, evaluations

- ``tasks.serving_generation`` (grows whenever the served prompt changes, also on a rollback)
  and ``tasks.min_score`` (the task's default classify threshold);
- ``prompt_versions.method``, ``classes``, ``metrics``, ``confusion``, ``history``: a version
  carries its own record, so any kept version can be listed, inspected and served again.
  Existing versions get the task's method; the served one also the task's classes, metrics,
  confusion and history (older ones have none: their classes are in the prompt's header);
- ``task_events`` (what happened to a task, in order) and ``evaluations`` (evaluation jobs).

Revision ID: b81f6c2d9e3a
Revises: a7c4e19d2b58
Create Date: 2026-12-05 10:00:00.000000+00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

import store.db


# revision identifiers, used by Alembic.
revision: str = 'b81f6c2d9e3a'
down_revision: Union[str, Sequence[str], None] = 'a7c4e19d2b58'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('serving_generation', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('min_score', sa.Double(), nullable=True))
    with op.batch_alter_table('prompt_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('method', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('classes', sa.JSON(none_as_null=True), nullable=True))
        batch_op.add_column(sa.Column('metrics', sa.JSON(none_as_null=True), nullable=True))
        batch_op.add_column(sa.Column('confusion', sa.JSON(none_as_null=True), nullable=True))
        batch_op.add_column(sa.Column('history', sa.JSON(none_as_null=True), nullable=True))

    # Backfill: every version gets its task's method, the served one the task's record; a task
    # serving a version starts at generation 1 (0 means "never served").
    op.execute(
        "UPDATE prompt_versions SET method = (SELECT t.method FROM tasks t WHERE t.id = prompt_versions.task_id)"
    )
    op.execute(
        "UPDATE prompt_versions SET "
        "classes = (SELECT t.classes FROM tasks t WHERE t.id = prompt_versions.task_id), "
        "metrics = (SELECT t.metrics FROM tasks t WHERE t.id = prompt_versions.task_id), "
        "confusion = (SELECT t.confusion FROM tasks t WHERE t.id = prompt_versions.task_id), "
        "history = (SELECT t.history FROM tasks t WHERE t.id = prompt_versions.task_id) "
        "WHERE version = (SELECT t.version FROM tasks t WHERE t.id = prompt_versions.task_id)"
    )
    op.execute("UPDATE tasks SET serving_generation = version WHERE version IS NOT NULL")

    op.create_table(
        'task_events',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('task_id', sa.String(length=32), nullable=False),
        sa.Column('tenant_id', sa.String(length=32), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('data', sa.JSON(none_as_null=True), nullable=False),
        sa.Column('created_at', store.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_task_events_task_id_tasks'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_task_events_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_task_events')),
    )
    with op.batch_alter_table('task_events', schema=None) as batch_op:
        batch_op.create_index('ix_task_events_task_id_id', ['task_id', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_task_events_tenant_id'), ['tenant_id'], unique=False)

    op.create_table(
        'evaluations',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('task_id', sa.String(length=32), nullable=False),
        sa.Column('tenant_id', sa.String(length=32), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('object_key', sa.String(length=512), nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('params', sa.JSON(none_as_null=True), nullable=False),
        sa.Column('result', sa.JSON(none_as_null=True), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('lease_owner', sa.String(length=128), nullable=True),
        sa.Column('lease_expires_at', store.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column('created_at', store.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column('finished_at', store.db.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'ready', 'failed')", name=op.f('ck_evaluations_status_valid')),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_evaluations_task_id_tasks'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_evaluations_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations')),
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index('ix_evaluations_task_id_created_at', ['task_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_tenant_id'), ['tenant_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('evaluations')
    op.drop_table('task_events')
    with op.batch_alter_table('prompt_versions', schema=None) as batch_op:
        batch_op.drop_column('history')
        batch_op.drop_column('confusion')
        batch_op.drop_column('metrics')
        batch_op.drop_column('classes')
        batch_op.drop_column('method')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('min_score')
        batch_op.drop_column('serving_generation')

"""samples over time, and predictions kept for feedback

- ``samples``: a task's labelled images (``store.samples``): the original bytes under the
  content-addressed ``samples/{tenant}/{sha256}``, or a member (``entry``) of the task's dataset
  zip; one label per decoded picture and task (unique ``task_id, pixels``);
- ``predictions``: images classified with ``keep=true``, kept until ``expires_at`` so that a
  feedback can turn one into a sample;
- ``tasks.samples_seeded`` (the dataset's images were expanded into samples; existing tasks
  are expanded lazily, by their next run or samples call), ``tasks.retrain_after_samples``
  (auto-retrain threshold, null: off) and ``tasks.samples_since_run``;
- ``prompt_versions.samples_sha256``, ``n_samples``, ``sample_counts``: the snapshot of samples
  a version was trained on (null for versions published before).

Revision ID: d9f3b6a2c418
Revises: c5e8a1f4b2d7
Create Date: 2026-12-07 10:00:00.000000+00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa

import store.db


# revision identifiers, used by Alembic.
revision: str = 'd9f3b6a2c418'
down_revision: Union[str, Sequence[str], None] = 'c5e8a1f4b2d7'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'samples',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('task_id', sa.String(length=32), nullable=False),
        sa.Column('tenant_id', sa.String(length=32), nullable=False),
        sa.Column('label', sa.String(length=1000), nullable=False),
        sa.Column('object_key', sa.String(length=512), nullable=False),
        sa.Column('entry', sa.String(length=1024), nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('pixels', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('source', sa.String(length=16), nullable=False),
        sa.Column('ordinal', sa.Integer(), server_default='0', nullable=False),
        sa.Column('created_at', store.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("source IN ('dataset', 'upload', 'feedback')", name=op.f('ck_samples_source_valid')),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_samples_task_id_tasks'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_samples_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_samples')),
        sa.UniqueConstraint('task_id', 'pixels', name=op.f('uq_samples_task_id_pixels')),
    )
    with op.batch_alter_table('samples', schema=None) as batch_op:
        batch_op.create_index('ix_samples_task_id_created_at', ['task_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_samples_tenant_id'), ['tenant_id'], unique=False)

    op.create_table(
        'predictions',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('task_id', sa.String(length=32), nullable=False),
        sa.Column('tenant_id', sa.String(length=32), nullable=False),
        sa.Column('object_key', sa.String(length=512), nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('label', sa.String(length=1000), nullable=True),
        sa.Column('score', sa.Double(), nullable=True),
        sa.Column('sample_id', sa.String(length=32), nullable=True),
        sa.Column('created_at', store.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column('expires_at', store.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_predictions_task_id_tasks'), ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_predictions_tenant_id_tenants'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_predictions')),
    )
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_predictions_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index('ix_predictions_task_id_created_at', ['task_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_tenant_id'), ['tenant_id'], unique=False)

    with op.batch_alter_table('prompt_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('samples_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('n_samples', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('sample_counts', sa.JSON(none_as_null=True), nullable=True))

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('samples_seeded', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('retrain_after_samples', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('samples_since_run', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('samples_since_run')
        batch_op.drop_column('retrain_after_samples')
        batch_op.drop_column('samples_seeded')
    with op.batch_alter_table('prompt_versions', schema=None) as batch_op:
        batch_op.drop_column('sample_counts')
        batch_op.drop_column('n_samples')
        batch_op.drop_column('samples_sha256')
    op.drop_table('predictions')
    op.drop_table('samples')

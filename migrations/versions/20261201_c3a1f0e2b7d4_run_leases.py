"""run leases: tasks.run_status, queued_at, lease_owner, lease_expires_at, requeues

The run state becomes a plain column (``run_status``) so that every transition of a task is
one conditional UPDATE on both databases (no JSON condition), and a running job holds a lease
(``lease_owner`` / ``lease_expires_at``) the reconciler checks (``worker.reconcile``).
``run_status`` is filled from ``status`` / ``training["status"]`` for existing rows; runs that
were queued get ``queued_at`` = their ``updated_at`` (the reconciler re-sends them if they are
still waiting). Batch mode so the downgrade's DROP COLUMN works on SQLite.

Revision ID: c3a1f0e2b7d4
Revises: 94874791fbde
Create Date: 2026-12-01 10:00:00.000000+00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = 'c3a1f0e2b7d4'
down_revision: Union[str, Sequence[str], None] = '94874791fbde'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('run_status', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('lease_owner', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('requeues', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_tasks_run_status'), ['run_status'], unique=False)

    tasks = sa.table(
        'tasks',
        sa.column('id', sa.String),
        sa.column('status', sa.String),
        sa.column('version', sa.Integer),
        sa.column('training', sa.JSON),
        sa.column('updated_at', sa.DateTime(timezone=True)),
        sa.column('run_status', sa.String),
        sa.column('queued_at', sa.DateTime(timezone=True)),
    )
    conn = op.get_bind()
    rows = conn.execute(sa.select(tasks.c.id, tasks.c.status, tasks.c.version, tasks.c.training, tasks.c.updated_at)).all()
    for r in rows:
        state = (r.training or {}).get('status') if r.version is not None else r.status
        values = {'run_status': state}
        if state == 'queued':
            values['queued_at'] = r.updated_at
        conn.execute(sa.update(tasks).where(tasks.c.id == r.id).values(**values))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tasks_run_status'))
        batch_op.drop_column('requeues')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_owner')
        batch_op.drop_column('queued_at')
        batch_op.drop_column('run_status')

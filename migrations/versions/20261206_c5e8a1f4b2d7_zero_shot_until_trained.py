"""tasks may serve zero-shot predictions until their first version

``tasks.zero_shot_until_trained`` (bool, default false): classify answers a task that has no
version yet with zero-shot predictions on its class names (``version`` 0) instead of 409.

Revision ID: c5e8a1f4b2d7
Revises: b81f6c2d9e3a
Create Date: 2026-12-06 10:00:00.000000+00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = 'c5e8a1f4b2d7'
down_revision: Union[str, Sequence[str], None] = 'b81f6c2d9e3a'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('zero_shot_until_trained', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_column('zero_shot_until_trained')

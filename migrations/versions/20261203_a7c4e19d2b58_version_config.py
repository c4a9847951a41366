"""prompt versions record the config and the dataset they were tuned with

``prompt_versions.config`` (nullable JSON) and ``prompt_versions.dataset_id`` (nullable): the
validated config and the dataset of the run that published the version, so a task shows the
served version's while a retrain with others runs. Versions published before this revision
have none (the task's own stand in).

Revision ID: a7c4e19d2b58
Revises: e5b2d9a41c07
Create Date: 2026-12-03 10:00:00.000000+00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = 'a7c4e19d2b58'
down_revision: Union[str, Sequence[str], None] = 'e5b2d9a41c07'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('prompt_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('config', sa.JSON(none_as_null=True), nullable=True))
        batch_op.add_column(sa.Column('dataset_id', sa.String(length=32), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('prompt_versions', schema=None) as batch_op:
        batch_op.drop_column('dataset_id')
        batch_op.drop_column('config')

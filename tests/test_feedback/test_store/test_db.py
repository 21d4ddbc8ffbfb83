"""The store's one-transaction-per-call contract (feedback.store.db.transaction)."""

import pytest
from sqlalchemy import select

from feedback.store import consent as consent_service


async def test_a_session_with_a_transaction_open_is_refused(store):
    async with store.sessions() as session:
        await session.execute(select(1))
        with pytest.raises(RuntimeError, match="one transaction each"):
            await consent_service.opt_out(session, user_id=1)

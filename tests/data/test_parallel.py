"""ordered_map: input order kept, and the input is never read far ahead (bounded memory)."""

import pytest

from pyllm.data.parallel import ordered_map


@pytest.mark.parametrize("workers", [1, 2])
def test_order_kept_and_read_ahead_bounded(workers):
    consumed = []

    def items():
        for i in range(40):
            consumed.append(i)
            yield -i

    window = 4
    for k, value in enumerate(ordered_map(abs, items(), workers=workers, window=window)):
        assert value == k
        # when result k is handed out, at most `window` more items have been taken from the input
        assert len(consumed) <= k + 1 + window


def test_unknown_engine():
    with pytest.raises(ValueError, match="engine"):
        list(ordered_map(abs, [1], workers=2, engine="spark"))

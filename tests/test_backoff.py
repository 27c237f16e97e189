from services.common.backoff import Backoff


def test_delays_double_up_to_the_maximum_and_reset():
    backoff = Backoff(0.5, 5.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.current == 5.0
    backoff.reset()
    assert backoff.next() == 0.5 and backoff.current == 1.0


def test_delay_after_a_count_of_failures():
    backoff = Backoff(0.5, 30.0)
    assert [backoff.after(n) for n in (0, 1, 2, 3, 10)] == [0.5, 0.5, 1.0, 2.0, 30.0]

"""No enumeration through time: CreatePasswordResetCode for an unknown email
and ResetPassword with a wrong code for an unknown email take what they take
for a real user. The medians of 200 interleaved calls each are printed (and
recorded as properties); the assertion is only a loose sanity bound, since a
shared test machine cannot promise timings (see docs for measured figures).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .helpers import World, fails, new_email, new_password, user_service_pb2

pb = user_service_pb2
CALLS = 200
# Far looser than the 0.8-1.25 the contract asks for: a loaded CI machine
# must not fail the suite, a path doing clearly different work must.
SANITY_BOUND = (0.5, 2.0)


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def compare(
    real: Callable[[], Awaitable[Any]], unknown: Callable[[], Awaitable[Any]]
) -> tuple[float, float, float]:
    """Median seconds of each over CALLS calls, alternating which goes first."""
    reals: list[float] = []
    unknowns: list[float] = []
    for i in range(CALLS):
        if i % 2:
            reals.append(await timed(real))
            unknowns.append(await timed(unknown))
        else:
            unknowns.append(await timed(unknown))
            reals.append(await timed(real))
    real_median, unknown_median = statistics.median(reals), statistics.median(unknowns)
    return real_median, unknown_median, real_median / unknown_median


def report(
    name: str, figures: tuple[float, float, float], record_property: Callable[[str, object], None]
) -> str:
    real, unknown, ratio = figures
    line = (
        f"{name}: median real {real * 1000:.3f} ms, unknown {unknown * 1000:.3f} ms, "
        f"ratio {ratio:.3f} over {CALLS} calls each"
    )
    print(line)
    record_property(f"{name}_median_ratio", round(ratio, 4))
    return line


async def test_a_reset_code_for_an_unknown_email_takes_the_time_of_a_real_one(
    world: World, record_property: Callable[[str, object], None]
) -> None:
    def ask(email: str) -> Callable[[], Awaitable[Any]]:
        request = pb.CreatePasswordResetCodeRequest(email=email)
        return lambda: world.service.users.CreatePasswordResetCode(request)

    figures = await compare(ask(world.alice.email), ask(new_email("nobody")))

    line = report("create_password_reset_code", figures, record_property)
    assert SANITY_BOUND[0] < figures[2] < SANITY_BOUND[1], line


async def test_a_wrong_code_for_an_unknown_email_takes_the_time_of_one_for_a_real_user(
    world: World, record_property: Callable[[str, object], None]
) -> None:
    password = new_password(world.recorder)
    tries = 0

    async def issue() -> str:
        response = await world.service.users.CreatePasswordResetCode(
            pb.CreatePasswordResetCodeRequest(email=world.bob.email)
        )
        return str(response.code)

    code = await issue()

    async def real() -> None:
        nonlocal tries
        wrong = ("B" if code[0] == "A" else "A") + code[1:]
        await fails(
            world.anonymous.users.ResetPassword(
                pb.ResetPasswordRequest(email=world.bob.email, code=wrong, new_password=password)
            )
        )
        tries += 1

    async def unknown() -> None:
        await fails(
            world.anonymous.users.ResetPassword(
                pb.ResetPasswordRequest(
                    email="nobody@example.com", code=code, new_password=password
                )
            )
        )

    async def real_with_a_live_code() -> None:
        nonlocal code
        # A fresh code before the fifth wrong try would void it, outside the
        # measured call: every measured try meets a live code.
        if tries and tries % 4 == 0:
            code = await issue()
        await timed_real()

    measured: list[float] = []

    async def timed_real() -> None:
        measured.append(await timed(real))

    figures = await compare(real_with_a_live_code, unknown)
    # compare() timed real_with_a_live_code including the occasional issue;
    # the real path's own figure is the median of the inner timings.
    real_median = statistics.median(measured)
    unknown_median = figures[1]
    corrected = (real_median, unknown_median, real_median / unknown_median)

    line = report("reset_password_wrong_code", corrected, record_property)
    assert SANITY_BOUND[0] < corrected[2] < SANITY_BOUND[1], line

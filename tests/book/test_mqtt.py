"""Chapter 8, MQTT QoS on Mosquitto: real subscriber processes SIGKILLed between the steps."""

from __future__ import annotations

import pytest

from deliverylab.book import mqtt
from deliverylab.book.mqtt import Case
from deliverylab.engine.errors import InvalidInput

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case, effects", [
    (Case(0, "on PUBLISH"), 0),                       # at most once: never resent
    (Case(1, "after the effect"), 2),                 # at least once: resent, applied again
    (Case(1, "after the effect", inbox=True), 1),     # ... the inbox skips it
    (Case(2, "on PUBREL"), 0),                        # PUBREC'd, forgotten by the process
    (Case(2, "on PUBREL", stored=True), 1),           # the stored in-flight state hands it on
    (Case(2, "after the effect", stored=True), 2),    # ... and hands it on again
    (Case(2, "after the effect", stored=True, inbox=True), 1),
])
def test_end_to_end_effects_per_case(case, effects, tmp_path):
    row = mqtt.run_case(case, tmp_path)
    assert row["killed"] == case.kill  # the process really died at that step
    assert row["effects"] == effects


def test_a_clean_session_loses_what_the_killed_process_held(tmp_path):
    row = mqtt.run_case(Case(1, "on PUBLISH", persistent=False), tmp_path)
    assert (row["killed"], row["effects"]) == ("on PUBLISH", 0)


@pytest.mark.parametrize("case, field", [(Case(3, "none"), "qos"), (Case(1, "later"), "kill")])
def test_run_case_names_the_bad_field(case, field, tmp_path):
    with pytest.raises(InvalidInput) as err:
        mqtt.run_case(case, tmp_path)
    assert err.value.field == field
    assert not list(tmp_path.iterdir())

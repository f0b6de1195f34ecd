"""Each provider reads its own settings (``Settings.section``) under the environment variables
moonbatch has always read; ``MOONBATCH_PROVIDER`` takes the registry's names."""

from __future__ import annotations

import pydantic
import pytest

from moonbatch.config import Settings
from moonbatch.workers.providers import DEFAULT_PROVIDER, PROVIDERS, get_provider
from moonbatch.workers.providers.fal.settings import FalSettings
from moonbatch.workers.providers.moondream.settings import MoondreamSettings
from moonbatch.workers.providers.realtime.settings import RealtimeSettings

ENV = {
    "MOONDREAM_API_KEY": "md-key", "MOONBATCH_MOONDREAM_URL": "http://batch.test/v1/",
    "MOONBATCH_PART_SIZE": "2048", "MOONBATCH_UPLOAD_CONCURRENCY": "3",
    "FAL_KEY": "fal-key", "MOONBATCH_FAL_QUEUE_URL": "http://fal.test/",
    "MOONBATCH_FAL_CONCURRENCY": "4", "MOONBATCH_FAL_QUEUE_AHEAD": "1",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:
    monkeypatch.chdir(tmp_path)  # no .env file of the checkout
    for name in (*ENV, "MOONBATCH_API_KEY", "MOONBATCH_FAL_KEY", "MOONBATCH_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_every_provider_variable_keeps_its_name(env):
    for name, value in ENV.items():
        env.setenv(name, value)
    settings = Settings()
    batch_api, fal = settings.section(MoondreamSettings), settings.section(FalSettings)
    assert batch_api.api_key() == "md-key"
    assert batch_api.moondream_url == "http://batch.test/v1"
    assert (batch_api.part_size, batch_api.upload_concurrency) == (2048, 3)
    assert fal.fal_api_key() == "fal-key" and fal.fal_queue_url == "http://fal.test"
    assert fal.fal_in_flight() == 5
    assert settings.section(MoondreamSettings) is batch_api  # read once per Settings


def test_the_default_queue_ahead_outlasts_the_refill_of_a_freed_runner(env):
    env.setenv("MOONBATCH_FAL_CONCURRENCY", "8")
    fal = Settings().section(FalSettings)
    assert fal.fal_in_flight() == 24  # unmeasured: twice as many again
    assert fal.fal_in_flight(1.0, 0.55) == 24  # a request outlasts the refill: still twice
    assert fal.fal_in_flight(0.2, 0.55) == 32  # the queue ahead must last three requests
    assert fal.fal_in_flight(2.0, 5.5) == 32  # 5 s between steps: three 2 s requests
    assert fal.fal_in_flight(0.01, 5.5) == 8 + 8 * 8  # at most 8 x the cap ahead
    env.setenv("MOONBATCH_FAL_QUEUE_AHEAD", "3")
    assert Settings().section(FalSettings).fal_in_flight(0.01, 5.5) == 11  # set: as set


def test_second_names_of_the_keys_and_a_fresh_read(env):
    env.setenv("MOONBATCH_API_KEY", "old-name")
    env.setenv("MOONBATCH_FAL_KEY", "old-fal-name")
    first = Settings()
    assert first.section(MoondreamSettings).api_key() == "old-name"
    assert first.section(FalSettings).fal_api_key() == "old-fal-name"
    env.setenv("MOONDREAM_API_KEY", "new")
    assert Settings().section(MoondreamSettings).api_key() == "new"  # a new Settings reads again


def test_a_provider_value_out_of_range_names_its_variable(env):
    env.setenv("MOONBATCH_PART_SIZE", "100000000")  # the API's part limit
    with pytest.raises(pydantic.ValidationError, match="part_size"):
        Settings().section(MoondreamSettings)


def test_the_provider_setting_takes_the_registry_names(env):
    assert Settings().provider == DEFAULT_PROVIDER
    for name in PROVIDERS:
        env.setenv("MOONBATCH_PROVIDER", name)
        assert Settings().provider == name
        assert get_provider(name).settings_class in (MoondreamSettings, FalSettings,
                                                     RealtimeSettings)
    env.setenv("MOONBATCH_PROVIDER", "nobody")
    with pytest.raises(pydantic.ValidationError) as info:
        Settings()
    assert "MOONBATCH_PROVIDER='nobody'" in str(info.value)
    assert all(name in str(info.value) for name in PROVIDERS)

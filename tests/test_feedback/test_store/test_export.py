"""Export in trl's columns: JSONL with image paths, a datasets.Dataset, and `smolcord export`."""

import json

from test_feedback.harness import make_image

from feedback.store import prompts as prompts_service
from feedback.store.export import METADATA_COLUMNS, export, pair_row, rated_row, to_dataset
from feedback.store.pairs import build_pairs, build_rated_answers
from smolcord.cli import main


async def two_turn_pair(store):
    """A follow-up (history with an image) whose two answers got a 👍 and a 👎."""
    await store.learning()
    first = await store.prompt("what is this?", images=[make_image(1)])
    response_id, [message] = await store.answer(first.id, "a cat")
    conversation = await store.call(
        prompts_service.get_conversation, settings=store.settings, message_id=message
    )
    follow = await store.prompt(
        "and this one?", images=[make_image(2)], history=conversation.turns, parent_response_id=response_id
    )
    _, [good] = await store.answer(follow.id, "a dog")
    _, [bad] = await store.answer(follow.id, "a cat again", regenerated=True)
    await store.vote(good, 1, "👍")
    await store.vote(bad, 2, "👎")
    return follow


async def test_pair_rows_in_trls_conversational_format(store):
    follow = await two_turn_pair(store)
    async with store.sessions() as session:
        [pair] = await build_pairs(session, settings=store.settings)
    row = pair_row(pair)
    assert list(row) == ["images", "prompt", "chosen", "rejected", *METADATA_COLUMNS["pairs"]]
    image = {"type": "image", "text": None}
    assert row["prompt"] == [
        {"role": "user", "content": [image, {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": [image, {"type": "text", "text": "and this one?"}]},
    ]
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "a dog"}]}]
    assert row["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": "a cat again"}]}]
    assert [path.split("/")[-1][:64] for path in row["images"]] == [
        make_image(1).sha256,
        make_image(2).sha256,
    ]
    assert row["prompt_key"] == follow.key


async def test_export_jsonl_loads_into_a_dataset_with_decoded_images(store, tmp_path):
    await two_turn_pair(store)
    out = tmp_path / "out" / "pairs.jsonl"
    async with store.sessions() as session:
        report = await export(session, settings=store.settings, out=out, kind="pairs")
    assert (report.rows, report.prompts, report.skipped) == (1, 1, 0)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    dataset = to_dataset(rows, kind="pairs")
    assert dataset.column_names == ["images", "prompt", "chosen", "rejected", *METADATA_COLUMNS["pairs"]]
    [example] = dataset
    assert [image.size for image in example["images"]] == [(8, 6), (8, 6)]
    assert example["chosen"][0]["content"][0]["text"] == "a dog"
    trl_only = to_dataset(rows, kind="pairs", metadata=False, decode_images=False)
    assert trl_only.column_names == ["images", "prompt", "chosen", "rejected"]
    assert trl_only[0]["images"] == rows[0]["images"]


async def test_unpaired_export_for_kto(store, tmp_path):
    await two_turn_pair(store)
    async with store.sessions() as session:
        rated = await build_rated_answers(session, settings=store.settings)
    rows = [rated_row(answer) for answer in rated]
    assert [(row["completion"][0]["content"][0]["text"], row["label"]) for row in rows] == [
        ("a dog", True),
        ("a cat again", False),
    ]
    dataset = to_dataset(rows, kind="unpaired")
    assert dataset.column_names == ["images", "prompt", "completion", "label", *METADATA_COLUMNS["unpaired"]]
    assert dataset["label"] == [True, False]
    async with store.sessions() as session:
        report = await export(session, settings=store.settings, out=tmp_path / "kto.jsonl", kind="unpaired")
    assert report.rows == 2


async def test_rows_whose_image_file_went_missing_are_left_out(store, tmp_path):
    await two_turn_pair(store)
    async with store.sessions() as session:
        [pair] = await build_pairs(session, settings=store.settings)
    pair.images[0].unlink()
    async with store.sessions() as session:
        report = await export(session, settings=store.settings, out=tmp_path / "x.jsonl")
    assert (report.rows, report.skipped) == (0, 1)


def test_empty_dataset_has_the_columns():
    assert to_dataset([], kind="pairs").column_names[:4] == ["images", "prompt", "chosen", "rejected"]


def test_cli_upgrades_and_exports_on_a_fresh_data_dir(tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "fresh" / "data"
    monkeypatch.setenv("SMOLCORD_DATA_DIR", str(data_dir))
    monkeypatch.delenv("SMOLCORD_DATABASE_URL", raising=False)
    assert main(["db", "upgrade"]) == 0
    assert (data_dir / "smolcord.db").is_file()
    assert "revision" in capsys.readouterr().out
    out = tmp_path / "pairs.jsonl"
    assert main(["export", str(out), "--kind", "pairs"]) == 0
    assert out.read_text() == "" and "wrote 0 pairs" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "kto.jsonl"), "--kind", "unpaired"]) == 0
    assert "0 rated answers" in capsys.readouterr().out


def test_cli_export_says_how_many_rows_it_left_out_and_why(settings, tmp_path, capsys):
    import asyncio

    from test_feedback.harness import StoreHarness, empty_shared_database

    from feedback.store.commands import export as export_command
    from feedback.store.db import create_engine, sessionmaker

    async def fill():
        engine = create_engine(settings.db_url)
        try:
            await empty_shared_database(engine)
            store = StoreHarness(sessionmaker(engine), settings)
            await store.learning()
            dm = await store.prompt("asked in a DM", guild_id=None)  # DMs never train
            _, [good] = await store.answer(dm.id, "good")
            _, [bad] = await store.answer(dm.id, "bad", regenerated=True)
            await store.vote(good, 1, "👍")
            await store.vote(bad, 2, "👎")
        finally:
            await engine.dispose()

    asyncio.run(fill())
    assert export_command(settings, tmp_path / "pairs.jsonl", "pairs") == 0
    out = capsys.readouterr().out
    assert "wrote 0 pairs" in out and "left out: 1 by consent" in out and "0 by the voter-share cap" in out


async def test_answers_are_rendered_without_the_space_the_model_generated_first(store):
    """The worker's text starts with the space generated after "Assistant:"; the chat template adds its
    own, so a trained answer (and a quoted one in the history) is stripped or it would teach two spaces."""
    await store.learning()
    first = await store.prompt("what is this?", images=[make_image(1)])
    response_id, [message] = await store.answer(first.id, " a cat\n")
    conversation = await store.call(
        prompts_service.get_conversation, settings=store.settings, message_id=message
    )
    follow = await store.prompt(
        "and this one?", images=[make_image(2)], history=conversation.turns, parent_response_id=response_id
    )
    _, [good] = await store.answer(follow.id, " a dog")
    _, [bad] = await store.answer(follow.id, "  a cat again", regenerated=True)
    await store.vote(good, 1, "👍")
    await store.vote(bad, 2, "👎")
    async with store.sessions() as session:
        [pair] = await build_pairs(session, settings=store.settings)
        rated = await build_rated_answers(session, settings=store.settings)
    row = pair_row(pair)
    assert row["prompt"][1] == {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}
    assert row["chosen"][0]["content"][0]["text"] == "a dog"
    assert row["rejected"][0]["content"][0]["text"] == "a cat again"
    assert {rated_row(answer)["completion"][0]["content"][0]["text"] for answer in rated} == {
        "a dog",
        "a cat again",
    }

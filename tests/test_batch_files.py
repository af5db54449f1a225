"""The Files API around batches, with the openai SDK on the real server: purposes (what an
upload may be for, what a listing filters on) and what deleting a running batch's input
does (the file goes for its owner at once, its bytes stay until the batch has ended)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import RunningServer, start_server, stop_server
from helpers import photo_bytes
from test_batches import jsonl, read_lines, request_line, upload_batch

from server.demo_model import DemoModelPaths


@pytest.fixture(scope="module")
def files_server(demo_model: DemoModelPaths, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RunningServer]:
    running = start_server(demo_model, tmp_path_factory.mktemp("batch-files") / "server.log",
                           env={"VLSERVE_API_KEYS": "key-a,key-b"})
    yield running
    stop_server(running)


def sdk(server: RunningServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api, api_key=key, max_retries=0, timeout=60)


def test_uploads_of_a_purpose_this_server_cannot_use_are_refused(
        files_server: RunningServer) -> None:
    client = sdk(files_server, "key-a")
    png = photo_bytes(64, 48)
    for purpose in ("vision", "user_data"):  # images a chat can name by file_id
        uploaded = client.files.create(file=("a.png", io.BytesIO(png)), purpose=purpose)
        assert uploaded.purpose == purpose
    for purpose in ("fine-tune", "assistants", "batch_output", "evals", ""):
        with pytest.raises(openai.BadRequestError) as caught:
            client.files.create(file=("a.png", io.BytesIO(png)),
                                purpose=purpose)  # type: ignore[arg-type]
        error = caught.value.body
        assert isinstance(error, dict), error
        assert error["param"] == "purpose" and error["code"] == "invalid_purpose", error
        assert repr(purpose) in error["message"]
    assert all(f.purpose in ("vision", "user_data") for f in client.files.list())


def test_listing_by_purpose_keeps_a_batch_cleanup_off_other_files(
        files_server: RunningServer) -> None:
    """The SDK sends `purpose` as a query parameter; a script that deletes every "batch"
    file must not take the key's images or the batches' output files with them."""
    client = sdk(files_server, "key-b")
    image = client.files.create(file=("a.png", io.BytesIO(photo_bytes(64, 48))),
                                purpose="vision")
    data = jsonl([request_line("one", [{"role": "user", "content": "Hi"}])])
    uploaded = upload_batch(client, data)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 60
    while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, done
        time.sleep(0.1)
    assert done.status == "completed" and done.output_file_id, done

    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]
    assert [f.id for f in client.files.list(purpose="batch_output")] == [done.output_file_id]
    assert [f.id for f in client.files.list(purpose="vision")] == [image.id]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == []
    assert len(list(client.files.list())) == 3
    for f in client.files.list(purpose="batch"):
        client.files.delete(f.id)
    assert client.files.retrieve(image.id).purpose == "vision"
    assert set(read_lines(client, done.output_file_id)) == {"one"}
    # The cursor runs over the filtered listing, as the SDK's auto-paging expects.
    paged = [f.id for f in client.files.list(purpose="batch_output", limit=1)]
    assert paged == [done.output_file_id]

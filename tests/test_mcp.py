"""The demo as an MCP server (`launch(mcp_server=True)`), driven by a real client from the `mcp` package.

gradio 6.31 returns a multi-output tool's results only to a client that asks for progress (its
other path wraps the outputs in one list and fails), so the client here passes a progress callback,
as agents that show progress do.
"""
from __future__ import annotations

import asyncio


def _session(url: str, work):
    """Run `work(session)` in an initialised MCP session with the app at `url`."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def run():
        async with streamablehttp_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    return asyncio.run(run())


def test_an_agent_lists_the_tools_and_reads_what_their_arguments_mean(app_url):
    async def work(session):
        return (await session.list_tools()).tools

    tools = {t.name: t for t in _session(app_url, work)}
    assert set(tools) == {"tokens", "generate", "score"}  # the page's own events stay out
    generate = tools["generate"]
    assert "token swap" in generate.description and "heat maps" in generate.description
    arguments = generate.inputSchema["properties"]
    assert "uploaded" not in arguments  # the page's state is not an argument
    assert "word=source" in arguments["swaps"]["description"] and arguments["steps"]["description"]
    assert "Token swap" in arguments["mode"]["enum"]


def test_an_agent_swaps_a_word_and_gets_the_images_back(app_url):
    import base64
    import io

    import numpy as np
    from PIL import Image

    progress = []

    async def work(session):
        async def seen(done, total, message):
            progress.append(message)

        return await session.call_tool("generate", {"mode": "Token swap", "prompt": "a red circle on a blue background",
                                                    "swaps": "red=yellow", "seed": 3, "steps": 6},
                                       progress_callback=seen)

    result = _session(app_url, work)
    assert not result.isError, result.content
    images = [Image.open(io.BytesIO(base64.b64decode(c.data))) for c in result.content if c.type == "image"]
    baseline, swapped = images[:2]
    assert baseline.size == swapped.size == (128, 128)
    assert not np.array_equal(np.asarray(baseline), np.asarray(swapped))  # the swap changed the picture
    texts = " ".join(c.text for c in result.content if c.type == "text")
    assert "--swap red=yellow --seed 3 --steps 6" in texts  # the command line that reproduces it
    assert any("denoising" in (m or "") for m in progress)


def test_an_agent_scores_its_generation_and_gets_the_per_token_maps_as_images(app_url):
    """`score` after `generate`: the table as text, and one per-token MI row per image as MCP image content
    (the tool had returned the rows as gradio updates, which reached the agent as their dicts' text)."""
    import base64
    import io

    from PIL import Image

    async def work(session):
        async def seen(done, total, message):
            pass

        made = await session.call_tool("generate", {"mode": "Token swap", "prompt": "a red circle on a blue background",
                                                    "swaps": "red=yellow", "seed": 3, "steps": 6},
                                       progress_callback=seen)
        assert not made.isError, made.content
        return await session.call_tool("score", {"map_mode": "overlay"}, progress_callback=seen)

    result = _session(app_url, work)
    assert not result.isError, result.content
    texts = [c.text for c in result.content if c.type == "text"]
    assert "| MI score (nats) |" in texts[0] and "`a yellow circle on a blue background`" in texts[0]
    assert not any("__type__" in t for t in texts)
    rows = [Image.open(io.BytesIO(base64.b64decode(c.data))) for c in result.content if c.type == "image"]
    assert len(rows) == 2  # baseline and swapped; the third box is empty
    assert all(row.width > 128 for row in rows)  # a row of token tiles, not a picture of the generation


def test_an_agent_reads_the_tokens_as_data_not_as_the_pages_html(app_url):
    """`tokens` gives an agent the table, the positions swapped and the p / p′ text (it had sent the page's views:
    two HTML blocks and a checkbox group's gradio update)."""
    import ast

    async def work(session):
        async def seen(done, total, message):
            pass

        return await session.call_tool("tokens", {"mode": "Token swap", "concept_key": None,
                                                  "prompt": "a red circle on a blue background", "swaps": "red=yellow"},
                                       progress_callback=seen)

    result = _session(app_url, work)
    assert not result.isError, result.content
    table, positions, texts = (c.text for c in result.content)
    table = ast.literal_eval(table)
    assert table["headers"][3] == "token of p" and [row[3] for row in table["data"]][:3] == ["<|startoftext|>", "a", "red"]
    assert table["data"][2][5] == "yellow"  # p′ holds the source at the swapped position
    assert ast.literal_eval(positions) == [2]
    assert "`2 red ← yellow`" in texts and "<span" not in texts


def test_an_agent_reads_error_messages_as_plain_text(app_url):
    """The page's toasts show messages HTML-escaped (a token such as `<holed-star>` is no tag there); an agent got
    the escapes too (`&lt;holed-star&gt;`) and now gets the words as written."""
    async def work(session):
        async def seen(done, total, message):
            pass

        tools = (await session.list_tools()).tools
        failed = await session.call_tool("generate", {"mode": "AlignIT (customized concept)",
                                                      "concept_key": "holed-star-ti", "prompt": "a photo of a star",
                                                      "seed": 0, "steps": 2}, progress_callback=seen)
        unknown = await session.call_tool("tokens", {"mode": "AlignIT (customized concept)", "concept_key": "<nope>",
                                                     "prompt": "a photo of a <nope>"}, progress_callback=seen)
        return tools, failed, unknown

    tools, failed, unknown = _session(app_url, work)
    assert failed.isError and "the concept token <holed-star> is not in the prompt" in failed.content[0].text
    assert unknown.isError and "unknown concept '<nope>'" in unknown.content[0].text
    assert all("caller" not in t.inputSchema["properties"] for t in tools)  # the request is no argument

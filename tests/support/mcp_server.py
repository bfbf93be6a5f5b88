"""A small stdio MCP server for the tests: newline-delimited JSON-RPC 2.0, as Claude Code speaks
it to a stdio server. Its name is argv[1]; it offers one tool, `lookup`, which answers with its
name, the query and the environment variable PROBE_GREETING (so a test sees the configured
args and env arrive)."""

import json
import os
import sys

NAME = sys.argv[1] if len(sys.argv) > 1 else "probe"


def answer(message_id, result=None, error=None):
    reply = {"jsonrpc": "2.0", "id": message_id}
    if error is not None:
        reply["error"] = error
    else:
        reply["result"] = result
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    message_id, method = message.get("id"), message.get("method")
    if message_id is None:
        continue  # a notification (notifications/initialized, cancelled): nothing to answer
    params = message.get("params") or {}
    if method == "initialize":
        answer(message_id, {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": NAME, "version": "1.0.0"},
        })
    elif method == "tools/list":
        answer(message_id, {"tools": [{
            "name": "lookup",
            "description": "Looks up the team's answer to a question (" + NAME + ")",
            "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        }]})
    elif method == "tools/call":
        query = (params.get("arguments") or {}).get("q", "")
        text = "answer from %s for %s: %s" % (NAME, query, os.environ.get("PROBE_GREETING", ""))
        answer(message_id, {"content": [{"type": "text", "text": text}]})
    elif method == "ping":
        answer(message_id, {})
    else:
        answer(message_id, error={"code": -32601, "message": "method not found: %s" % method})

"""An example MCP server (stdio) for the README walk-through: the `mail` upstream of examples/mcp.yaml.

send_email answers with a rollback token in `_meta`, which the sidecar records.
"""

import mcp_types as types
from mcp.server.mcpserver import MCPServer

server = MCPServer("mail")


@server.tool()
def send_email(to: list[str], subject: str, body: str) -> types.CallToolResult:
    """Send an email on behalf of the organisation."""
    return types.CallToolResult(
        content=[types.TextContent(text=f"queued for {', '.join(to)}")],
        _meta={"rollback_token": "recall-msg-0001"},
    )


if __name__ == "__main__":
    import asyncio

    asyncio.run(server.run_stdio_async())

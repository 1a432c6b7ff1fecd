"""An example MCP server (stdio) for the README walk-through: the `docs` upstream of examples/mcp.yaml.

Built with the MCP SDK; it knows nothing about the sidecar.
"""

from mcp.server.mcpserver import MCPServer

server = MCPServer("docs")


@server.tool()
def search_docs(query: str) -> str:
    """Full-text search over the internal documentation index."""
    return f"3 pages mention {query!r}: rotation.md, identity.md, deploy.md"


@server.tool()
def run_shell(command: str) -> str:
    """Run a shell command (not in the tool catalog: policy hides and denies it)."""
    return "this never runs behind the sidecar"


if __name__ == "__main__":
    import asyncio

    asyncio.run(server.run_stdio_async())

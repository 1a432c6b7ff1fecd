"""The MCP gateway: a second front door beside the gRPC servicer (docs/mcp.md).

`gateway.McpGateway` serves MCP over Streamable HTTP, decides every
`tools/call` with the Gate, and has the call made by `sidecar.invoke`.
`names` holds the rule that turns an upstream's tool into the name agents see.
"""

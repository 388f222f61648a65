// Sends calls through @segment/analytics-node, unmodified, in its default batching mode (tests/test_sdk_node.py).
// stdin: {"host", "writeKey", "calls": [{"kind": "track"|"page"|"identify"|"group"|"alias", ...params}]}
// stdout: {"errors": [...], "requests": [the bodies the SDK posted, as sent], "statuses": [...]}
'use strict'
const { Analytics } = require('@segment/analytics-node')

async function main() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  const spec = JSON.parse(Buffer.concat(chunks).toString('utf8'))
  const analytics = new Analytics({ writeKey: spec.writeKey, host: spec.host })
  const errors = []
  const requests = []
  const statuses = []
  analytics.on('error', (err) => errors.push(String((err && err.reason) || err && err.code || err)))
  analytics.on('http_request', (req) => requests.push({ url: req.url, headers: req.headers, body: req.body }))
  analytics.on('http_response', (res) => statuses.push(res.status))
  for (const call of spec.calls) {
    const { kind, ...params } = call
    if (params.timestamp) params.timestamp = new Date(params.timestamp)
    analytics[kind](params)
  }
  await analytics.closeAndFlush()
  process.stdout.write(JSON.stringify({ errors, requests, statuses }))
}

main().catch((err) => {
  process.stderr.write(String((err && err.stack) || err))
  process.exit(1)
})

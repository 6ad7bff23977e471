// Drives the real @castore/event-storage-adapter-postgres (npm 2.4.2) for the interop tests.
// Reads one JSON request on stdin, prints one JSON response on stdout:
//   request:  {connectionString, tableName, eventStoreId, read: [ids], write: [events],
//              duplicate: event | null, list: bool}
//   response: {read: {id: [events]}, written: [events], duplicate: {name, code} | null,
//              listed: [ids]}
// Castore interpolates tableName unquoted, so "schema.table" addresses a schema.
"use strict";

const { PostgresEventStorageAdapter } = require("@castore/event-storage-adapter-postgres");

async function main() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));
  const adapter = new PostgresEventStorageAdapter({
    connectionString: request.connectionString,
    tableName: request.tableName,
  });
  const context = { eventStoreId: request.eventStoreId };
  const response = { read: {}, written: [], duplicate: null, listed: [] };
  try {
    for (const event of request.write || []) {
      const { event: stored } = await adapter.pushEvent(event, { ...context, force: false });
      response.written.push(stored);
    }
    if (request.duplicate) {
      try {
        await adapter.pushEvent(request.duplicate, { ...context, force: false });
      } catch (error) {
        response.duplicate = { name: error.constructor.name, code: error.code || null };
      }
    }
    for (const aggregateId of request.read || []) {
      const { events } = await adapter.getEvents(aggregateId, context, {});
      response.read[aggregateId] = events;
    }
    if (request.list) {
      const { aggregateIds } = await adapter.listAggregateIds(context, {});
      response.listed = aggregateIds.map((entry) => entry.aggregateId);
    }
  } finally {
    await adapter._sql.end({ timeout: 5 });
  }
  process.stdout.write(JSON.stringify(response));
}

main().catch((error) => {
  process.stderr.write(`${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});

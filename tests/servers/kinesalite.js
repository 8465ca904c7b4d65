// Starts kinesalite (a Kinesis emulator that reshards like Kinesis does: records follow
// their hash key to the child shards after a split) on 127.0.0.1 only; its own CLI
// binds every interface. Usage: node kinesalite.js PORT [DATA_DIR]
// With DATA_DIR, streams and records persist there (LevelDB), so the server can be
// stopped and started again with its data, as an outage test needs.
const kinesalite = require('kinesalite');

const port = Number(process.argv[2]);
const options = { createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 50 };
if (process.argv[3]) options.path = process.argv[3];
const server = kinesalite(options);
server.listen(port, '127.0.0.1', (error) => {
  if (error) throw error;
  console.log(`kinesalite listening on 127.0.0.1:${port}`);
});

// Starts kinesalite (a Kinesis emulator that reshards like Kinesis does: records follow
// their hash key to the child shards after a split) on 127.0.0.1 only; its own CLI
// binds every interface. Usage: node kinesalite.js PORT
const kinesalite = require('kinesalite');

const port = Number(process.argv[2]);
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 50 });
server.listen(port, '127.0.0.1', (error) => {
  if (error) throw error;
  console.log(`kinesalite listening on 127.0.0.1:${port}`);
});

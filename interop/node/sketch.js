// A heartbeat.v1 client on @grpc/proto-loader: say Hello, answer every Ping.
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const options = { includeDirs: [process.env.HEARTBEAT_PROTO_DIR ?? '../../proto'], longs: Number, enums: String, oneofs: true };
const { heartbeat } = /** @type {any} */ (grpc.loadPackageDefinition(loader.loadSync('heartbeat/v1/heartbeat.proto', options)));
const client = new heartbeat.v1.HeartbeatService(process.argv[2], grpc.credentials.createInsecure());
const call = client.Heartbeat();
call.on('data', (/** @type {any} */ frame) => {
  if (frame.frame === 'welcome') console.log('session', frame.welcome.sessionId);
  else if (frame.frame === 'ping') call.write({ pong: { seq: frame.ping.seq } }); // all it takes to stay alive
  else if (frame.frame === 'goodbye') console.log('goodbye', frame.goodbye.reason);
});
call.on('error', (/** @type {any} */ end) => console.log('ended', grpc.status[end.code])); // without it, any error status would crash
call.write({ hello: { clientId: process.argv[3] } });

// A real Bayeux server (npm faye) for listenerd's Bayeux client to talk to.
//
// Listens on 127.0.0.1, port 0 (the OS picks); prints {"port": N} on stdout once listening.
// Reads JSON lines on stdin: {"publish": channel, "data": {...}} publishes through faye's own server-side
// client; {"forget": clientId} destroys that client's session on the server. Prints one JSON line per client-side event it sees: {"subscribe": ch, "clientId": id},
// {"unsubscribe": ch, ...}, {"disconnect": id}, {"published": ch}.
// Requests must carry "Authorization: Bearer <TOKEN>" (env FAYE_TOKEN, default "peer-token"): checked by
// a server extension that sees the HTTP request, as Salesforce checks its bearer token.
'use strict';

const http = require('http');
const path = require('path');
const readline = require('readline');
const faye = require(path.join(__dirname, 'node_modules', 'faye'));

const token = process.env.FAYE_TOKEN || 'peer-token';
const timeout = Number(process.env.FAYE_TIMEOUT || '2');
const bayeux = new faye.NodeAdapter({ mount: '/cometd', timeout });

bayeux.addExtension({
  incoming(message, request, callback) {
    // no request: faye's own in-process publisher, which needs no token
    const auth = request && request.headers ? request.headers.authorization : undefined;
    if (request && message.channel.startsWith('/meta/') && auth !== `Bearer ${token}`) {
      message.error = '401::Authentication invalid';
    }
    callback(message);
  },
});

const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
bayeux.on('subscribe', (clientId, channel) => say({ subscribe: channel, clientId }));
bayeux.on('unsubscribe', (clientId, channel) => say({ unsubscribe: channel, clientId }));
bayeux.on('disconnect', (clientId) => say({ disconnect: clientId }));

const server = http.createServer();
bayeux.attach(server);
server.listen(0, '127.0.0.1', () => say({ port: server.address().port }));

const publisher = bayeux.getClient();
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (!line.trim()) return;
  const command = JSON.parse(line);
  if (command.forget) {
    // faye forgets the client, as a restarted or load-balanced Bayeux server does: its next
    // request is answered "401:<id>:Unknown client" with advice handshake.
    bayeux._server._engine.destroyClient(command.forget, () => say({ forgotten: command.forget }));
    return;
  }
  publisher.publish(command.publish, command.data).then(() => say({ published: command.publish }));
});
process.stdin.on('end', () => process.exit(0));

// pusher-js 8 (from tests/peers/node_modules) as a peer of the Pusher simulator.
//
// Usage: node pusher_js_client.js HOST PORT KEY CHANNEL [CHANNEL ...]
// Every channel is subscribed on the one connection pusher-js keeps. Writes one JSON object per line
// to stdout: {"type":"connected"|"auth"|"subscribed"|"subscription_error"|"event"|"state"|"error", ...};
// channel lines name their "channel". Private and presence channels are authorized by the test: on
// {"type":"auth","socket_id":...} the test writes {"auth": "...", "channel_data"?} on stdin, signed by
// the official `pusher` Python library. On stdin, {"subscribe": CH} and {"unsubscribe": CH} change the
// channels on the live connection; {"quit": true} disconnects.
'use strict';
const path = require('path');
const Pusher = require(path.join(__dirname, 'node_modules', 'pusher-js'));
const readline = require('readline');

const [host, port, key, ...channels] = process.argv.slice(2);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const pendingAuth = [];

const pusher = new Pusher(key, {
  cluster: 'mt1',
  wsHost: host,
  wsPort: Number(port),
  forceTLS: false,
  enabledTransports: ['ws'],
  disableStats: true,
  channelAuthorization: {
    customHandler: (params, callback) => {
      pendingAuth.push(callback);
      out({ type: 'auth', socket_id: params.socketId, channel: params.channelName });
    },
  },
});

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.quit) {
    pusher.disconnect();
    setTimeout(() => process.exit(0), 50);
  } else if (msg.subscribe) {
    follow(msg.subscribe);
  } else if (msg.unsubscribe) {
    pusher.unsubscribe(msg.unsubscribe);
    out({ type: 'unsubscribed', channel: msg.unsubscribe });
  } else if (pendingAuth.length) {
    pendingAuth.shift()(null, msg);
  }
});

pusher.connection.bind('state_change', (s) => out({ type: 'state', previous: s.previous, current: s.current }));
pusher.connection.bind('connected', () => out({ type: 'connected', socket_id: pusher.connection.socket_id }));
pusher.connection.bind('error', (e) => out({ type: 'error', error: JSON.stringify(e && (e.error || e)) }));
function follow(channel) {
  const ch = pusher.subscribe(channel);
  ch.bind('pusher:subscription_succeeded', () => out({ type: 'subscribed', channel }));
  ch.bind('pusher:subscription_error', (e) => out({ type: 'subscription_error', channel, status: e && e.status,
    error: String(e && (e.error || e.type)) }));
  ch.bind_global((event, data) => {
    if (!event.startsWith('pusher:') && !event.startsWith('pusher_internal:')) {
      out({ type: 'event', channel, event, data });
    }
  });
}
channels.forEach(follow);

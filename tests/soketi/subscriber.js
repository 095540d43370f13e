// A pusher-js client for tests/test_soketi.py: what a browser would see from soketi.
//
// Subscribes to the public, private and encrypted channels named in CHANNELS (comma
// separated) and signs in as USER_ID (for #server-to-user- events). Authorisation is
// computed here, as an app's auth endpoint would: HMAC-SHA256 with the app secret, and for
// private-encrypted- channels the shared secret SHA256(channel name + master key), exactly
// as Pusher's server libraries do. Prints one JSON object a line on stdout:
//   {"ready": true}                              every subscription and the signin succeeded
//   {"channel": C, "event": E, "data": D}        an event received (D as pusher-js gives it)
//   {"error": ...}                               anything that went wrong (a refused
//                                                connection: its protocol code, if any)
// Settings come from the environment: SOKETI_PORT, APP_KEY, APP_SECRET, CHANNELS, USER_ID,
// MASTER_KEY_BASE64.
'use strict';

const crypto = require('crypto');
const Pusher = require('pusher-js');

const env = process.env;
const secret = env.APP_SECRET;
const channels = env.CHANNELS.split(',');
const masterKey = Buffer.from(env.MASTER_KEY_BASE64 || '', 'base64');

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function sign(text) {
  const signature = crypto.createHmac('sha256', secret).update(text).digest('hex');
  return env.APP_KEY + ':' + signature;
}

const pusher = new Pusher(env.APP_KEY, {
  cluster: 'mt1',
  wsHost: '127.0.0.1',
  wsPort: Number(env.SOKETI_PORT),
  forceTLS: false,
  enabledTransports: ['ws'],
  disableStats: true,
  channelAuthorization: {
    customHandler: ({ socketId, channelName }, callback) => {
      const answer = { auth: sign(socketId + ':' + channelName) };
      if (channelName.startsWith('private-encrypted-')) {
        answer.shared_secret = crypto.createHash('sha256')
          .update(Buffer.concat([Buffer.from(channelName), masterKey])).digest('base64');
      }
      callback(null, answer);
    },
  },
  userAuthentication: {
    customHandler: ({ socketId }, callback) => {
      const userData = JSON.stringify({ id: env.USER_ID });
      callback(null, { auth: sign(socketId + '::user::' + userData), user_data: userData });
    },
  },
});

let waiting = channels.length + 1; // every subscription, and the signin
function oneReady() {
  waiting -= 1;
  if (waiting === 0) out({ ready: true });
}

pusher.connection.bind('error', (err) => out({
  error: 'connection',
  detail: String(err && err.type),
  // the Pusher protocol's close code, when the server gave one (4001: no app with this key)
  code: err && err.error && err.error.data ? err.error.data.code : null,
}));
for (const name of channels) {
  const channel = pusher.subscribe(name);
  channel.bind('pusher:subscription_succeeded', oneReady);
  channel.bind('pusher:subscription_error', (status) => out({ error: 'subscription', channel: name, status }));
  channel.bind_global((event, data) => {
    if (!event.startsWith('pusher:') && !event.startsWith('pusher_internal:')) {
      out({ channel: name, event, data });
    }
  });
}
pusher.user.bind_global((event, data) => out({ channel: 'user:' + env.USER_ID, event, data }));
pusher.signin();
pusher.user.signinDonePromise.then(() => {
  if (pusher.user.user_data) oneReady();
  else out({ error: 'signin' });
});
process.on('SIGTERM', () => { pusher.disconnect(); process.exit(0); });

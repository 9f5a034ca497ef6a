// @ts-check
/**
 * A browser client for heartbeat.v1: one session kept alive over a WebSocket,
 * as the contract's "Browsers" section maps it. One ES module, no build step,
 * no dependencies.
 *
 * ```js
 * import { HeartbeatSession } from 'https://heartbeat.example.com/heartbeat.js';
 * const session = new HeartbeatSession('wss://heartbeat.example.com/v1/heartbeat', {
 *   clientId: 'user-42', labels: { tab: 'inbox' },
 * });
 * session.addEventListener('connected', (e) => console.log('session', e.detail.sessionId));
 * session.addEventListener('lost', (e) => console.log('lost', e.detail.kind, e.detail.goodbye));
 * session.start();
 * addEventListener('pagehide', () => session.close());
 * ```
 *
 * It says Hello, adopts the interval and timeout of Welcome, answers every
 * server Ping at once, pings at the interval and measures round trips. When
 * the server falls silent for the timeout, says Goodbye or closes the socket,
 * it emits `lost` and reconnects after a jittered backoff, or after the
 * server's `reconnect_after` hint. `close()` says `Goodbye{CLIENT_SHUTDOWN}`.
 * Events (`CustomEvent`s, their `detail` typed below) are those of the
 * project's other clients: `connected`, `rotated`, `rtt`, `lost`,
 * `reconnecting`, `closed` (the last).
 *
 * **Rotation.** When the server asks a live session to rotate
 * (`Goodbye{ROTATE}`: it reached the server's maximum age; the socket stays
 * open for a grace period), the client makes before it breaks: it opens a
 * second socket with the same Hello while the first goes on answering pings,
 * emits `rotated` (not `connected`) once the new session is welcomed, and
 * lets the old socket go. The server ends that one with `Goodbye{REPLACED}`
 * and close code 4007, the rotation's normal end, which is not reported.
 * The server replaces only sessions with a client id, so an anonymous
 * session leaves the old socket itself (`Goodbye{CLIENT_SHUTDOWN}`, then
 * close code 1000) rather than let it linger to the end of its grace and be
 * recorded as `ROTATED`; that end is not reported either. If no successor
 * can be opened, the old session carries on, and the end of its grace (a
 * second `ROTATE`, then the close) is an ordinary `lost`.
 *
 * **Hidden tabs.** Browsers throttle the timers of hidden tabs (Chrome runs
 * them at most once a minute after five minutes hidden), so a ping loop
 * there would stall and then burst, and a silence watchdog would fire late
 * or, after the tab is frozen, spuriously. While the tab is hidden the client
 * therefore stops its own pings and its watchdog. The session stays alive
 * because answering the server's pings runs on message events, which are not
 * throttled; when the tab is shown again the watchdog starts afresh and a
 * ping measures the round trip at once. A page that is frozen outright runs
 * nothing: the server then ends the session as TIMEOUT, as it should.
 */

/** The page's document; absent in a worker, which has no visibility to follow. */
const doc = globalThis.document;

/** The two subprotocols: binary protobuf frames, or proto3 JSON text. */
const PROTOCOLS = Object.freeze({ proto: 'heartbeat.v1.proto', json: 'heartbeat.v1.json' });

/** `GoodbyeReason` names by number, for the binary encoding. */
const GOODBYE_REASONS = [
  'GOODBYE_REASON_UNSPECIFIED',
  'GOODBYE_REASON_CLIENT_SHUTDOWN',
  'GOODBYE_REASON_SERVER_SHUTDOWN',
  'GOODBYE_REASON_TIMEOUT',
  'GOODBYE_REASON_TOO_MANY_PINGS',
  'GOODBYE_REASON_PROTOCOL_VIOLATION',
  'GOODBYE_REASON_EVICTED',
  'GOODBYE_REASON_REPLACED',
  'GOODBYE_REASON_ROTATE',
];

/** Bounds on what a Welcome may set, and the interval used if it sets none. */
const MIN_INTERVAL_MS = 10;
const MAX_INTERVAL_MS = 3_600_000;
const DEFAULT_INTERVAL_MS = 10_000;
/** The longest reconnect hint honoured. */
const MAX_HINT_MS = 600_000;
/** Reasons after which coming straight back would only repeat the offence. */
const OBJECTIONS = new Set([
  'GOODBYE_REASON_TOO_MANY_PINGS',
  'GOODBYE_REASON_PROTOCOL_VIOLATION',
  'GOODBYE_REASON_EVICTED',
]);
const REPLACED = 'GOODBYE_REASON_REPLACED';

/**
 * @typedef {{ sessionId: string, pingIntervalMs: number, timeoutMs: number }} Connected
 * @typedef {{ from: string, to: string, pingIntervalMs: number, timeoutMs: number }} Rotated
 *   The server asked session `from` to rotate (`Goodbye{ROTATE}`: it reached
 *   the server's maximum age), and the client moved to its successor `to`
 *   before leaving it (make-before-break): no loss, and presence never showed
 *   the client id missing. The interval and timeout are the successor's.
 * @typedef {{ seq: number, rttMs: number, smoothedMs: number }} RoundTrip
 * @typedef {{ kind: 'timeout' | 'goodbye' | 'closed', code: number | null, message: string,
 *   goodbye: string | null, reconnectAfterMs: number | null }} Lost
 *   `kind` is `timeout` (no server frame for the timeout, or no Welcome within
 *   the handshake timeout), `goodbye` (the server said why), or `closed` (the
 *   socket closed or failed without a goodbye). `code` is the close code
 *   (4000 + the goodbye's reason after a server goodbye, 1006 for a dropped
 *   connection or a refused upgrade).
 * @typedef {{ attempt: number, delayMs: number }} Reconnecting
 * @typedef {{ replaced: boolean }} Closed
 * @typedef {{ baseMs?: number, capMs?: number, resetAfterMs?: number }} BackoffOptions
 * @typedef {{
 *   clientId?: string, labels?: Record<string, string>, token?: string,
 *   encoding?: 'proto' | 'json', sendPings?: boolean, backoff?: BackoffOptions,
 *   handshakeTimeoutMs?: number, closeTimeoutMs?: number,
 * }} SessionOptions
 *   `token` travels as the subprotocol `bearer.<token>` (browsers cannot set
 *   headers on a WebSocket), so it must be an HTTP token: letters, digits and
 *   `!#$%&'*+-.^_|~` and backquote.
 * @typedef {{
 *   readonly liveSince: number | null, readonly sessionId: string | null, readonly rotating: boolean,
 *   ended: Promise<Lost | null>, live: Promise<void>, rotate: Promise<void>,
 *   leave(): void, retire(goodbye: boolean): void, cancel(): void,
 * }} Conversation
 *   One socket, as `HeartbeatSession.converse` holds it. `ended` settles
 *   when the socket is done: with the loss, or null after a goodbye, a
 *   retirement or a cancel. `live` settles at Welcome; `rotate` when the
 *   server first asks the live session to rotate (the socket stays open).
 *   `leave()` says goodbye; `retire(false)` keeps only answering the
 *   server's pings until it closes the socket, at most one timeout long, and
 *   reports nothing; `retire(true)` says goodbye and closes the socket
 *   instead, waits at most `closeTimeoutMs`, and reports nothing either;
 *   `cancel()` closes it.
 */

/**
 * Reconnect delays: exponential, capped, with full jitter (a uniform draw
 * between zero and the ceiling), so a fleet that lost the same server does
 * not return all at once. The policy is the Rust client's.
 */
export class Backoff {
  /** @param {BackoffOptions} [options] */
  constructor({ baseMs = 200, capMs = 15000, resetAfterMs = 30000 } = {}) {
    if (!(baseMs > 0)) throw new RangeError(`Backoff baseMs is ${baseMs}; it must be greater than 0`);
    if (!(capMs >= baseMs)) throw new RangeError(`Backoff capMs (${capMs}) must not be less than baseMs (${baseMs})`);
    this.baseMs = baseMs;
    this.capMs = capMs;
    this.resetAfterMs = resetAfterMs;
  }

  /** A delay for attempt `attempt` (from 1). @param {number} attempt */
  delayMs(attempt) {
    return Math.random() * Math.min(this.capMs, this.baseMs * 2 ** Math.min(Math.max(attempt - 1, 0), 31));
  }

  /** The wait after a `reconnect_after` hint: the hint plus up to half again. @param {number} hintMs */
  afterHintMs(hintMs) {
    return hintMs + Math.random() * Math.max(hintMs / 2, this.baseMs);
  }

  /** The wait after the server objected to this client. */
  afterObjectionMs() {
    return this.capMs / 2 + (Math.random() * this.capMs) / 2;
  }
}

/**
 * A heartbeat session kept alive across losses. See the module's docs.
 */
export class HeartbeatSession extends EventTarget {
  /**
   * @param {string | URL} url the server's `/v1/heartbeat` (`wss://…`; `https://…` is taken as `wss://…`)
   * @param {SessionOptions} [options]
   */
  constructor(url, options = {}) {
    super();
    const target = new URL(url, globalThis.location?.href);
    if (target.protocol === 'https:') target.protocol = 'wss:';
    if (target.protocol === 'http:') target.protocol = 'ws:';
    if (target.protocol !== 'ws:' && target.protocol !== 'wss:') {
      throw new TypeError(`${url} is not a ws:, wss:, http: or https: URL`);
    }
    if (target.pathname === '/') target.pathname = '/v1/heartbeat';
    this.url = target.href;
    const encoding = options.encoding ?? 'proto';
    if (!(encoding in PROTOCOLS)) throw new TypeError(`encoding is ${encoding}; use 'proto' or 'json'`);
    /** @type {'proto' | 'json'} */
    this.encoding = encoding;
    /** The subprotocol, and the token when there is one. @type {string[]} */
    this.protocols = [PROTOCOLS[encoding]];
    if (options.token) {
      if (!/^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/.test(options.token)) {
        throw new TypeError('the token must be an HTTP token (letters, digits and !#$%&\'*+-.^_`|~) to travel as a WebSocket subprotocol');
      }
      this.protocols.push(`bearer.${options.token}`);
    }
    this.hello = { clientId: options.clientId ?? '', labels: { ...(options.labels ?? {}) } };
    this.sendPings = options.sendPings ?? true;
    this.backoff = new Backoff(options.backoff);
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.closeTimeoutMs = options.closeTimeoutMs ?? 2_000;
    /** The open session's id, or null between sessions. @type {string | null} */
    this.sessionId = null;
    /** The smoothed round-trip time in ms, once measured. @type {number | null} */
    this.rttMs = null;
    /** @type {Promise<void> | null} */
    this.running = null;
    this.closing = false;
    /**
     * The sockets a close must reach with a goodbye: the session's, and
     * during a rotation its successor's too. @type {Set<Conversation>}
     */
    this.listening = new Set();
    /**
     * Old sessions of rotations, answering pings until the server ends them
     * (or, for an anonymous client, saying goodbye). @type {Set<Conversation>}
     */
    this.retiring = new Set();
    /** Ends the current backoff wait early. @type {(() => void) | null} */
    this.wake = null;
  }

  /** Starts the session (once); returns `this`. */
  start() {
    this.running ??= this.run();
    return this;
  }

  /** Says goodbye and resolves once the session has ended (at most `closeTimeoutMs`). */
  async close() {
    this.closing = true;
    for (const conversation of this.listening) conversation.leave();
    this.wake?.();
    await this.running;
  }

  /** @param {string} type @param {unknown} detail */
  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  async run() {
    let attempt = 0;
    let replaced = false;
    while (!this.closing) {
      const { lost, liveSince, final } = await this.attempt();
      this.sessionId = null;
      if (lost === null) break;
      this.emit('lost', lost);
      if (final) {
        // A newer session with this client id took over; coming back would
        // only replace it in turn.
        replaced = true;
        break;
      }
      if (this.closing) break;
      if (liveSince !== null && performance.now() - liveSince >= this.backoff.resetAfterMs) attempt = 0;
      attempt += 1;
      const delayMs = this.retryDelayMs(lost, attempt);
      this.emit('reconnecting', { attempt, delayMs });
      await new Promise((resolve) => {
        if (this.closing) return resolve(undefined);
        const timer = setTimeout(resolve, delayMs);
        this.wake = () => {
          clearTimeout(timer);
          resolve(undefined);
        };
      });
      this.wake = null;
    }
    // Old sessions still retiring need no goodbye: their successor's Hello
    // has replaced them, or (anonymous) they have said theirs.
    for (const conversation of this.retiring) conversation.cancel();
    this.emit('closed', { replaced });
  }

  /** @param {Lost} lost @param {number} attempt */
  retryDelayMs(lost, attempt) {
    if (lost.reconnectAfterMs !== null) return this.backoff.afterHintMs(Math.min(lost.reconnectAfterMs, MAX_HINT_MS));
    if (lost.goodbye !== null && OBJECTIONS.has(lost.goodbye)) return this.backoff.afterObjectionMs();
    // Anything else, a reason newer than this client included (which the
    // contract says to treat like a shutdown): the usual backoff.
    return this.backoff.delayMs(attempt);
  }

  /**
   * One session, from connect to loss (`lost`) or close (`lost === null`),
   * moving to a successor whenever the server asks it to rotate; with the
   * time it went live, and whether the loss is final (replaced by a newer
   * session that is not its own successor).
   * @returns {Promise<{ lost: Lost | null, liveSince: number | null, final: boolean }>}
   */
  async attempt() {
    if (this.closing) return { lost: null, liveSince: null, final: false };
    let current = this.converse(null);
    for (;;) {
      const turn = await Promise.race([current.ended.then((lost) => ({ lost })), current.rotate.then(() => null)]);
      if (turn !== null) {
        const { lost } = turn;
        return { lost, liveSince: current.liveSince, final: lost?.goodbye === REPLACED && !current.rotating };
      }
      const old = current;
      if (this.closing) {
        // The close reached the old session, which says goodbye.
        await old.ended;
        return { lost: null, liveSince: old.liveSince, final: false };
      }
      // Make before break: the successor's Hello replaces the old session,
      // which meanwhile stays open and goes on answering pings.
      const successor = this.converse(old.sessionId);
      const handshake = await Promise.race([successor.live.then(() => null), successor.ended.then((lost) => ({ lost }))]);
      if (handshake === null) {
        // The server replaces only sessions with a client id: nothing
        // replaces an anonymous one, so it leaves now rather than linger to
        // the end of its grace and close as ROTATED.
        old.retire(this.hello.clientId === '');
        current = successor;
        continue;
      }
      // No successor now: the old session carries on, and the end of its
      // grace (a second ROTATE) is its end. A close reached it too.
      const lost = await old.ended;
      if (lost === null || handshake.lost === null) return { lost: null, liveSince: old.liveSince, final: false };
      // The successor's Hello reached the server, which replaced the old
      // session, and then the successor failed: its failure is the loss. A
      // session asked to rotate never stops for good.
      return { lost: lost.goodbye === REPLACED ? handshake.lost : lost, liveSince: old.liveSince, final: false };
    }
  }

  /**
   * Opens a socket and holds its conversation: Hello and Welcome, pongs,
   * pings and round trips, the watchdog (paused in hidden tabs), the
   * server's goodbye. `rotatedFrom` names the session this one succeeds,
   * which makes Welcome emit `rotated` rather than `connected`.
   * @param {string | null} rotatedFrom
   * @returns {Conversation}
   */
  converse(rotatedFrom) {
    const socket = new WebSocket(this.url, this.protocols);
    socket.binaryType = 'arraybuffer';
    const codec = this.encoding === 'proto' ? protoCodec : jsonCodec;
    /** @type {number | null} */
    let liveSince = null;
    /** @type {string | null} */
    let sessionId = null;
    /** @type {ServerGoodbye | null} */
    let goodbye = null;
    let done = false;
    let leaving = false;
    let rotating = false;
    let retiring = false;
    let intervalMs = DEFAULT_INTERVAL_MS;
    let timeoutMs = 3 * DEFAULT_INTERVAL_MS;
    let seq = 0;
    /** When the last ping went out. */
    let lastPingAt = -Infinity;
    /** @type {Map<number, number>} */
    const sent = new Map();
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    let deadline;
    /** @type {ReturnType<typeof setInterval> | undefined} */
    let pinger;
    // The executors run at once, so these are set before anything calls them.
    let settleEnded = /** @type {(lost: Lost | null) => void} */ (() => {});
    let settleLive = () => {};
    let settleRotate = () => {};
    /** @type {Promise<Lost | null>} */
    const over = new Promise((resolve) => (settleEnded = resolve));
    /** @type {Promise<void>} */
    const live = new Promise((resolve) => (settleLive = resolve));
    /** @type {Promise<void>} */
    const rotate = new Promise((resolve) => (settleRotate = resolve));

    /** @param {Lost | null} lost */
    const finish = (lost) => {
      if (done) return;
      done = true;
      clearTimeout(deadline);
      clearInterval(pinger);
      unfollow();
      this.listening.delete(conversation);
      this.retiring.delete(conversation);
      if (socket.readyState === WebSocket.CONNECTING || socket.readyState === WebSocket.OPEN) socket.close();
      settleEnded(lost);
    };
    const silence = () =>
      finish(
        leaving
          ? null
          : goodbye !== null
            ? ended(null, '')
            : {
                kind: 'timeout',
                code: null,
                message: liveSince === null ? `no Welcome within ${this.handshakeTimeoutMs} ms` : `no frame from the server for ${timeoutMs} ms`,
                goodbye: null,
                reconnectAfterMs: null,
              },
      );
    /** @param {number} ms @param {() => void} [then] */
    const arm = (ms, then = silence) => {
      clearTimeout(deadline);
      deadline = setTimeout(then, ms);
    };
    /** @param {number | null} code @param {string} reason @returns {Lost} */
    const ended = (code, reason) => {
      if (goodbye === null) return { kind: 'closed', code, message: reason, goodbye: null, reconnectAfterMs: null };
      return { kind: 'goodbye', code, message: goodbye.message, goodbye: goodbye.reason, reconnectAfterMs: goodbye.reconnectAfterMs };
    };
    /** @param {ClientFrame} frame */
    const send = (frame) => {
      if (!done && !leaving && socket.readyState === WebSocket.OPEN) socket.send(codec.encode(frame));
    };
    const ping = () => {
      const at = performance.now();
      lastPingAt = at;
      seq += 1;
      sent.set(seq, at);
      // Pings unanswered for a whole timeout will never be answered.
      for (const [old, when] of sent) if (at - when > timeoutMs) sent.delete(old);
      send({ ping: { seq } });
    };
    // Whether the live session's watchdog and pings run: not while the tab
    // is hidden (see "Hidden tabs" above). The handshake's, close()'s and a
    // retirement's own bounds always run.
    const watching = () => liveSince !== null && goodbye === null && !leaving && !retiring && !done;
    const pause = () => {
      clearInterval(pinger);
      pinger = undefined;
      if (watching()) clearTimeout(deadline);
    };
    const resume = () => {
      if (!watching()) return;
      arm(timeoutMs);
      if (this.sendPings && pinger === undefined) {
        // Measure at once, unless a ping just went out: a tab flicked
        // back and forth must not send unsolicited pings closer together
        // than the server's rate rule allows.
        if (performance.now() - lastPingAt >= intervalMs) ping();
        pinger = setInterval(ping, intervalMs);
      }
    };
    const hidden = () => doc?.hidden ?? false;
    const onVisibility = () => (hidden() ? pause() : resume());
    doc?.addEventListener('visibilitychange', onVisibility);
    // After a freeze (`freeze`/`resume` of the Page Lifecycle API).
    doc?.addEventListener('resume', onVisibility);
    const unfollow = () => {
      doc?.removeEventListener('visibilitychange', onVisibility);
      doc?.removeEventListener('resume', onVisibility);
    };

    socket.addEventListener('message', (event) => {
      const now = performance.now();
      /** @type {ServerFrame} */
      let frame;
      try {
        frame = codec.decode(event.data);
      } catch (error) {
        // The server speaks the contract; this is a defect, not the network.
        console.error('heartbeat: a frame from the server could not be read', error);
        return;
      }
      if (retiring) {
        // Only what keeps the old session alive until the server ends it
        // (its REPLACED goodbye and close code 4007 are the rotation's end).
        if (frame.ping) send({ pong: { seq: frame.ping.seq } });
        return;
      }
      if (goodbye === null && !leaving && !(liveSince !== null && hidden())) arm(liveSince === null ? this.handshakeTimeoutMs : timeoutMs);
      if (frame.welcome && liveSince === null) {
        const welcome = frame.welcome;
        if (welcome.pingIntervalMs !== null) intervalMs = Math.min(Math.max(welcome.pingIntervalMs, MIN_INTERVAL_MS), MAX_INTERVAL_MS);
        const offered = welcome.timeoutMs ?? 0;
        // A timeout not longer than the interval would give up on the
        // server just as its next ping is due: take three intervals.
        timeoutMs = Math.min(offered > intervalMs ? offered : 3 * intervalMs, 3 * MAX_INTERVAL_MS);
        liveSince = now;
        sessionId = welcome.sessionId;
        this.sessionId = welcome.sessionId;
        if (hidden()) pause();
        else {
          arm(timeoutMs);
          if (this.sendPings) pinger = setInterval(ping, intervalMs);
        }
        if (rotatedFrom === null) this.emit('connected', { sessionId: welcome.sessionId, pingIntervalMs: intervalMs, timeoutMs });
        else this.emit('rotated', { from: rotatedFrom, to: welcome.sessionId, pingIntervalMs: intervalMs, timeoutMs });
        settleLive();
      } else if (frame.ping) {
        send({ pong: { seq: frame.ping.seq } });
      } else if (frame.pong) {
        const at = sent.get(frame.pong.seq);
        if (at !== undefined) {
          sent.delete(frame.pong.seq);
          const rttMs = now - at;
          this.rttMs = this.rttMs === null ? rttMs : this.rttMs + (rttMs - this.rttMs) / 8;
          this.emit('rtt', { seq: frame.pong.seq, rttMs, smoothedMs: this.rttMs });
        }
      } else if (frame.goodbye?.reason === 'GOODBYE_REASON_ROTATE' && liveSince !== null && !rotating && !leaving && !this.closing) {
        // Asked to rotate: the socket stays open for the grace, so this is
        // no end, and pings go on; a second ask is the end of the grace.
        rotating = true;
        settleRotate();
      } else if (frame.goodbye) {
        // The close frame follows at once; wait a little for it, and ping no more.
        goodbye = frame.goodbye;
        clearInterval(pinger);
        if (!leaving) arm(Math.min(timeoutMs, this.closeTimeoutMs));
      }
    });
    socket.addEventListener('close', (event) => finish(leaving || retiring ? null : ended(event.code, event.reason)));
    socket.addEventListener('open', () => {
      if (!leaving) socket.send(codec.encode({ hello: this.hello }));
    });

    /** @type {Conversation} */
    const conversation = {
      get liveSince() {
        return liveSince;
      },
      get sessionId() {
        return sessionId;
      },
      get rotating() {
        return rotating;
      },
      ended: over,
      live,
      rotate,
      leave: () => {
        if (done || leaving) return;
        // Also before Welcome: frames keep their order, so the server reads
        // the goodbye after the Hello.
        if (socket.readyState === WebSocket.OPEN) {
          socket.send(codec.encode({ goodbye: { reason: 'GOODBYE_REASON_CLIENT_SHUTDOWN' } }));
          socket.close(1000);
        } else {
          socket.close();
        }
        leaving = true;
        pause();
        arm(this.closeTimeoutMs);
      },
      retire: (goodbye) => {
        if (done) return;
        retiring = true;
        pause();
        unfollow();
        this.listening.delete(conversation);
        this.retiring.add(conversation);
        if (goodbye) {
          // Bounded by the close timeout; a goodbye a close already said
          // keeps its own bound.
          conversation.leave();
          return;
        }
        // The server closes the socket at once (REPLACED, as the successor's
        // Hello arrived) or after the grace (ROTATED): one timeout is plenty.
        arm(timeoutMs, () => finish(null));
      },
      cancel: () => finish(null),
    };
    this.listening.add(conversation);
    arm(this.handshakeTimeoutMs);
    return conversation;
  }
}

/**
 * @typedef {{ hello: { clientId: string, labels: Record<string, string> } }
 *   | { ping: { seq: number } } | { pong: { seq: number } }
 *   | { goodbye: { reason: 'GOODBYE_REASON_CLIENT_SHUTDOWN' } }} ClientFrame
 * @typedef {{ reason: string, message: string, reconnectAfterMs: number | null }} ServerGoodbye
 * @typedef {{
 *   welcome?: { sessionId: string, pingIntervalMs: number | null, timeoutMs: number | null },
 *   ping?: { seq: number }, pong?: { seq: number }, goodbye?: ServerGoodbye,
 * }} ServerFrame
 *   A server frame, read; an empty object is a frame this client does not know.
 * @typedef {{ encode(frame: ClientFrame): string | Uint8Array<ArrayBuffer>, decode(data: unknown): ServerFrame }} Codec
 */

/** proto3 JSON (`heartbeat.v1.json`). @type {Codec} */
const jsonCodec = {
  encode(frame) {
    // seq is a uint64: a string in proto3 JSON.
    if ('ping' in frame) return JSON.stringify({ ping: { seq: String(frame.ping.seq) } });
    if ('pong' in frame) return JSON.stringify({ pong: { seq: String(frame.pong.seq) } });
    return JSON.stringify(frame);
  },
  decode(data) {
    if (typeof data !== 'string') throw new TypeError('a binary message on heartbeat.v1.json');
    const frame = JSON.parse(data);
    if (frame.welcome) {
      const welcome = frame.welcome;
      return {
        welcome: {
          sessionId: welcome.sessionId ?? '',
          pingIntervalMs: welcome.pingInterval ? jsonDurationMs(welcome.pingInterval) : null,
          timeoutMs: welcome.timeout ? jsonDurationMs(welcome.timeout) : null,
        },
      };
    }
    if (frame.ping) return { ping: { seq: Number(frame.ping.seq ?? 0) } };
    if (frame.pong) return { pong: { seq: Number(frame.pong.seq ?? 0) } };
    if (frame.goodbye) {
      const goodbye = frame.goodbye;
      const reason = typeof goodbye.reason === 'number' ? reasonName(goodbye.reason) : (goodbye.reason ?? GOODBYE_REASONS[0]);
      return {
        goodbye: {
          reason,
          message: goodbye.message ?? '',
          reconnectAfterMs: goodbye.reconnectAfter ? jsonDurationMs(goodbye.reconnectAfter) : null,
        },
      };
    }
    return {};
  },
};

/** A proto3 JSON duration (`"1.500s"`) in milliseconds. @param {string} text */
function jsonDurationMs(text) {
  const match = /^(-?\d+(?:\.\d{1,9})?)s$/.exec(text);
  if (!match) throw new TypeError(`${text} is not a proto3 JSON duration`);
  return Number(match[1]) * 1000;
}

/** @param {number} reason */
function reasonName(reason) {
  return GOODBYE_REASONS[reason] ?? `GOODBYE_REASON_${reason}`;
}

/**
 * The protobuf binary encoding (`heartbeat.v1.proto`) of the few frames a
 * session uses, by hand: the field numbers are the contract's, unknown
 * fields are skipped, and nothing else is needed for it.
 * @type {Codec}
 */
const protoCodec = {
  encode(frame) {
    const out = new Writer();
    if ('hello' in frame) {
      const hello = new Writer();
      hello.string(1, frame.hello.clientId);
      for (const [key, value] of Object.entries(frame.hello.labels)) {
        const entry = new Writer();
        entry.string(1, key);
        entry.string(2, value);
        hello.message(2, entry);
      }
      out.message(1, hello);
    } else if ('ping' in frame || 'pong' in frame) {
      const body = new Writer();
      body.varint(1, 'ping' in frame ? frame.ping.seq : frame.pong.seq);
      out.message('ping' in frame ? 2 : 3, body);
    } else {
      const goodbye = new Writer();
      goodbye.varint(1, GOODBYE_REASONS.indexOf(frame.goodbye.reason));
      out.message(4, goodbye);
    }
    return out.finish();
  },
  decode(data) {
    if (!(data instanceof ArrayBuffer)) throw new TypeError('a text message on heartbeat.v1.proto');
    /** @type {ServerFrame} */
    const frame = {};
    for (const [field, value] of fields(new Uint8Array(data))) {
      if (!(value instanceof Uint8Array)) continue;
      if (field === 1) {
        const welcome = { sessionId: '', pingIntervalMs: /** @type {number | null} */ (null), timeoutMs: /** @type {number | null} */ (null) };
        for (const [inner, part] of fields(value)) {
          if (inner === 1 && part instanceof Uint8Array) welcome.sessionId = utf8.decode(part);
          if (inner === 2 && part instanceof Uint8Array) welcome.pingIntervalMs = durationMs(part);
          if (inner === 3 && part instanceof Uint8Array) welcome.timeoutMs = durationMs(part);
        }
        frame.welcome = welcome;
      } else if (field === 2 || field === 3) {
        let seq = 0;
        for (const [inner, part] of fields(value)) if (inner === 1 && typeof part === 'number') seq = part;
        if (field === 2) frame.ping = { seq };
        else frame.pong = { seq };
      } else if (field === 4) {
        /** @type {ServerGoodbye} */
        const goodbye = { reason: GOODBYE_REASONS[0], message: '', reconnectAfterMs: null };
        for (const [inner, part] of fields(value)) {
          if (inner === 1 && typeof part === 'number') goodbye.reason = reasonName(part);
          if (inner === 2 && part instanceof Uint8Array) goodbye.message = utf8.decode(part);
          if (inner === 3 && part instanceof Uint8Array) goodbye.reconnectAfterMs = durationMs(part);
        }
        frame.goodbye = goodbye;
      }
    }
    return frame;
  },
};

const utf8 = new TextDecoder();
const utf8Encoder = new TextEncoder();

/** A `google.protobuf.Duration`, encoded, in milliseconds. @param {Uint8Array} bytes */
function durationMs(bytes) {
  let seconds = 0;
  let nanos = 0;
  for (const [field, value] of fields(bytes)) {
    if (field === 1 && typeof value === 'number') seconds = value;
    if (field === 2 && typeof value === 'number') nanos = value;
  }
  return seconds * 1000 + nanos / 1e6;
}

/**
 * The fields of an encoded message: varints as numbers (exact below 2^53,
 * which covers every value a session sends), length-delimited ones as bytes;
 * fixed-width ones are skipped, as none of ours uses them.
 * @param {Uint8Array} bytes
 * @returns {Generator<[number, number | Uint8Array]>}
 */
function* fields(bytes) {
  let at = 0;
  const varint = () => {
    let value = 0;
    let scale = 1;
    for (;;) {
      if (at >= bytes.length) throw new RangeError('a truncated varint');
      const byte = bytes[at++];
      value += (byte & 0x7f) * scale;
      if (byte < 0x80) return value;
      scale *= 128;
    }
  };
  while (at < bytes.length) {
    const key = varint();
    const field = Math.floor(key / 8);
    switch (key % 8) {
      case 0:
        yield [field, varint()];
        break;
      case 1:
        at += 8;
        break;
      case 2: {
        const length = varint();
        if (at + length > bytes.length) throw new RangeError('a truncated field');
        yield [field, bytes.subarray(at, at + length)];
        at += length;
        break;
      }
      case 5:
        at += 4;
        break;
      default:
        throw new RangeError(`wire type ${key % 8} is not one proto3 uses`);
    }
  }
}

/** Builds an encoded message. */
class Writer {
  constructor() {
    /** @type {number[]} */
    this.bytes = [];
  }

  /** @param {number} value */
  raw(value) {
    let rest = value;
    while (rest >= 0x80) {
      this.bytes.push((rest % 128) | 0x80);
      rest = Math.floor(rest / 128);
    }
    this.bytes.push(rest);
  }

  /** @param {number} field @param {number} value */
  varint(field, value) {
    this.raw(field * 8);
    this.raw(value);
  }

  /** @param {number} field @param {Uint8Array | number[]} bytes */
  bytesField(field, bytes) {
    this.raw(field * 8 + 2);
    this.raw(bytes.length);
    for (const byte of bytes) this.bytes.push(byte);
  }

  /** @param {number} field @param {string} text */
  string(field, text) {
    if (text !== '') this.bytesField(field, utf8Encoder.encode(text));
  }

  /** @param {number} field @param {Writer} message */
  message(field, message) {
    this.bytesField(field, message.bytes);
  }

  finish() {
    return Uint8Array.from(this.bytes);
  }
}

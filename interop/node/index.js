// @ts-check
/**
 * A Node client for heartbeat.v1: sessions that stay alive and presence
 * watches that resume, on the project's `.proto` files loaded at run time by
 * `@grpc/proto-loader`.
 *
 * The loader options are chosen so that nothing surprises a JavaScript user:
 * - `longs: Number`: uint64 values are numbers. The server draws its epoch
 *   below 2^53, so a watcher resumes with the exact epoch it was given.
 * - `enums: String`: reasons arrive as names (`GOODBYE_REASON_TIMEOUT`).
 * - `oneofs: true`: a frame names its kind (`response.frame === 'ping'`).
 * - `defaults: true`: unset scalars read as 0 or '', unset messages as null.
 * Durations arrive as `{seconds, nanos}`; `durationMs` turns one into
 * milliseconds.
 *
 * grpc-js calls emit `'error'` on any non-OK status, and an `'error'` event
 * with no listener ends the process. The classes here always listen, and
 * report endings as `'lost'` events or rejected iterations instead.
 */
'use strict';

const path = require('node:path');
const { EventEmitter } = require('node:events');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** The loader options described above. */
const LOADER_OPTIONS = Object.freeze({ longs: Number, enums: String, defaults: true, oneofs: true });

/** The contract's files, relative to the proto directory. */
const PROTO_FILES = ['heartbeat/v1/heartbeat.proto', 'heartbeat/v1/presence.proto'];

/**
 * @typedef {{ seconds: number, nanos: number }} Duration
 * @typedef {{ sessionId: string, clientId: string, labels: Record<string, string>, peer: string,
 *   rtt: Duration | null, state: string }} SessionView
 *   A `heartbeat.v1.Session`, as loaded (the fields this package reads).
 * @typedef {{
 *   HeartbeatService: typeof grpc.Client,
 *   PresenceService: typeof grpc.Client,
 * }} Services
 */

/**
 * Loads the services from the `.proto` files in `protoDir` (by default
 * `proto/` at the top of the repository, or `HEARTBEAT_PROTO_DIR`).
 * @param {string} [protoDir]
 * @returns {Services}
 */
function loadServices(protoDir = process.env.HEARTBEAT_PROTO_DIR || path.join(__dirname, '..', '..', 'proto')) {
  const definition = protoLoader.loadSync(PROTO_FILES, { ...LOADER_OPTIONS, includeDirs: [protoDir] });
  const loaded = /** @type {any} */ (grpc.loadPackageDefinition(definition));
  return { HeartbeatService: loaded.heartbeat.v1.HeartbeatService, PresenceService: loaded.heartbeat.v1.PresenceService };
}

/**
 * A Duration (`{seconds, nanos}`, as loaded) in milliseconds.
 * @param {Duration} duration
 */
function durationMs(duration) {
  return Number(duration.seconds) * 1000 + duration.nanos / 1e6;
}

/**
 * `authorization: Bearer <token>` metadata (empty without a token).
 * @param {string | undefined} token
 */
function bearer(token) {
  const metadata = new grpc.Metadata();
  if (token) {
    if (/[\s\x00-\x1f\x7f]/.test(token)) {
      throw new TypeError('the token holds white space or control characters; pass the token alone');
    }
    metadata.set('authorization', `Bearer ${token}`);
  }
  return metadata;
}

/** The name of a status code (`DEADLINE_EXCEEDED`). @param {number} code */
function statusName(code) {
  return grpc.status[code] ?? String(code);
}

/**
 * Reconnect delays: exponential, capped, with full jitter (a uniform draw
 * between zero and the ceiling), so a fleet that lost the same server does
 * not return all at once. The policy is the Rust client's.
 */
class Backoff {
  /**
   * @param {{ baseMs?: number, capMs?: number, resetAfterMs?: number }} [options]
   */
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

/** Bounds on what a Welcome may set, and the interval used if it sets none. */
const MIN_INTERVAL_MS = 10;
const MAX_INTERVAL_MS = 3_600_000;
const DEFAULT_INTERVAL_MS = 10_000;
/** The longest reconnect hint honoured. */
const MAX_HINT_MS = 600_000;
/** Reasons after which coming straight back would only repeat the offence. */
const OBJECTIONS = new Set(['GOODBYE_REASON_TOO_MANY_PINGS', 'GOODBYE_REASON_PROTOCOL_VIOLATION', 'GOODBYE_REASON_EVICTED']);
const REPLACED = 'GOODBYE_REASON_REPLACED';
/**
 * Each call gets a connection of its own rather than one shared through
 * grpc-js's global subchannel pool: a rotation's successor, opened while the
 * old session's client is still up, must make a new connection, which a load
 * balancer may send to another server.
 */
const OWN_CONNECTION = Object.freeze({ 'grpc.use_local_subchannel_pool': 1 });

/**
 * @typedef {{ sessionId: string, pingIntervalMs: number, timeoutMs: number }} Connected
 * @typedef {{ from: string, to: string, pingIntervalMs: number, timeoutMs: number }} Rotated
 *   The server asked session `from` to rotate (`Goodbye{ROTATE}`: it reached
 *   the server's maximum age), and the client moved to its successor `to`
 *   before leaving it (make-before-break): no loss, and presence never showed
 *   the client id missing. The interval and timeout are the successor's.
 * @typedef {{ seq: number, rttMs: number, smoothedMs: number }} RoundTrip
 * @typedef {{ kind: 'timeout' | 'goodbye' | 'status', code: string | null, message: string,
 *   goodbye: string | null, reconnectAfterMs: number | null }} Lost
 *   `kind` is `timeout` (no server frame for the timeout, or no Welcome within
 *   the handshake timeout), `goodbye` (the server said why), or `status` (the
 *   call ended with a status and no goodbye). `code` is the final status.
 * @typedef {{ attempt: number, delayMs: number }} Reconnecting
 * @typedef {{ replaced: boolean }} Closed
 * @typedef {{
 *   clientId?: string, labels?: Record<string, string>, credentials?: grpc.ChannelCredentials,
 *   token?: string, sendPings?: boolean, backoff?: Backoff, handshakeTimeoutMs?: number,
 *   closeTimeoutMs?: number, services?: Services,
 * }} SessionOptions
 * @typedef {{
 *   readonly liveSince: number | null, readonly sessionId: string | null, readonly rotating: boolean,
 *   ended: Promise<Lost | null>, live: Promise<void>, rotate: Promise<void>,
 *   leave(): void, retire(goodbye: boolean): void, cancel(): void,
 * }} Conversation
 *   One call, as `Session.converse` holds it. `ended` settles when the call
 *   is over: with the loss, or null after a goodbye, a retirement or a
 *   cancel. `live` settles at Welcome; `rotate` when the server first asks
 *   the live session to rotate (the call stays open). `leave()` says goodbye;
 *   `retire(false)` keeps only answering the server's pings until it ends the
 *   call, at most one timeout long, and reports nothing; `retire(true)` says
 *   goodbye and half-closes instead, waits at most `closeTimeoutMs`, and
 *   reports nothing either; `cancel()` ends it.
 */

/**
 * A heartbeat session kept alive across losses: it says Hello, adopts the
 * interval and timeout of Welcome, answers every server Ping at once, pings
 * at the interval and measures round trips. When the server falls silent for
 * the timeout, ends the call or says Goodbye, it emits `'lost'` and reconnects
 * after a jittered backoff, or after the server's `reconnect_after` hint.
 * `close()` says `Goodbye{CLIENT_SHUTDOWN}` and half-closes.
 *
 * When the server asks a live session to rotate (`Goodbye{ROTATE}`; the
 * stream stays open for a grace period), it makes before it breaks: it opens
 * a successor on a new connection with the same Hello while the old call
 * goes on answering pings, emits `'rotated'` (not `'connected'`) once the
 * successor is welcomed, and lets the old call go. The server ends that one
 * as `REPLACED`, the rotation's normal end, which is not reported. The server
 * replaces only sessions with a client id, so an anonymous session leaves the
 * old call itself (`Goodbye{CLIENT_SHUTDOWN}` and a half-close) rather than
 * let it linger to the end of its grace and be recorded as `ROTATED`; that
 * end is not reported either. If no successor can be opened, the old
 * session carries on, and the end of its grace (a second `ROTATE`, then
 * `UNAVAILABLE`) is an ordinary `'lost'`.
 *
 * Events: `'connected'` (Connected), `'rotated'` (Rotated), `'rtt'`
 * (RoundTrip), `'lost'` (Lost), `'reconnecting'` (Reconnecting), `'closed'`
 * (Closed, the last). It never emits `'error'`.
 */
class Session extends EventEmitter {
  /**
   * @param {string} target `host:port`
   * @param {SessionOptions} [options]
   */
  constructor(target, options = {}) {
    super();
    this.target = target;
    this.hello = { clientId: options.clientId ?? '', labels: { ...(options.labels ?? {}) } };
    this.credentials = options.credentials ?? grpc.credentials.createInsecure();
    this.metadata = bearer(options.token);
    this.sendPings = options.sendPings ?? true;
    this.backoff = options.backoff ?? new Backoff();
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.closeTimeoutMs = options.closeTimeoutMs ?? 2_000;
    this.services = options.services ?? loadServices();
    // A malformed target throws here, to the caller, not later in the task.
    new this.services.HeartbeatService(target, this.credentials).close();
    /** The open session's id, or null between sessions. @type {string | null} */
    this.sessionId = null;
    /** The smoothed round-trip time in ms, once measured. @type {number | null} */
    this.rttMs = null;
    /** @type {Promise<void> | null} */
    this.running = null;
    this.closing = false;
    /**
     * The calls a close must reach with a goodbye: the session's, and during
     * a rotation its successor's too. @type {Set<Conversation>}
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
      // A 'lost' listener may have closed the session.
      if (this.closing) break;
      if (liveSince !== null && performance.now() - liveSince >= this.backoff.resetAfterMs) attempt = 0;
      attempt += 1;
      const delayMs = this.retryDelayMs(lost, attempt);
      this.emit('reconnecting', { attempt, delayMs });
      await new Promise((resolve) => {
        // So may a 'reconnecting' listener.
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
   * Opens a call and holds its conversation: Hello and Welcome, pongs, pings
   * and round trips, the deadline, the server's goodbye. `rotatedFrom` names
   * the session this one succeeds, which makes Welcome emit `'rotated'`
   * rather than `'connected'`.
   * @param {string | null} rotatedFrom
   * @returns {Conversation}
   */
  converse(rotatedFrom) {
    const client = new this.services.HeartbeatService(this.target, this.credentials, OWN_CONNECTION);
    const call = /** @type {grpc.ClientDuplexStream<any, any>} */ (
      /** @type {any} */ (client).Heartbeat(this.metadata)
    );
    /** @type {number | null} */
    let liveSince = null;
    /** @type {string | null} */
    let sessionId = null;
    /** @type {any} */
    let goodbye = null;
    let done = false;
    let leaving = false;
    let rotating = false;
    let retiring = false;
    let intervalMs = DEFAULT_INTERVAL_MS;
    let timeoutMs = 3 * DEFAULT_INTERVAL_MS;
    let seq = 0;
    /** @type {Map<number, number>} */
    const sent = new Map();
    /** @type {NodeJS.Timeout | undefined} */
    let deadline;
    /** @type {NodeJS.Timeout | undefined} */
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
      this.listening.delete(conversation);
      this.retiring.delete(conversation);
      call.cancel();
      client.close();
      settleEnded(lost);
    };
    // Counts arm() calls: a frame that arrives re-arms the deadline.
    let armed = 0;
    /** @param {number} ms @param {() => void} then */
    const arm = (ms, then) => {
      armed += 1;
      clearTimeout(deadline);
      deadline = setTimeout(then, ms);
    };
    const silence = () => {
      // Timers run before I/O callbacks: after a blocked event loop, frames
      // that have arrived are still unread. Look once more after them.
      const at = armed;
      setImmediate(() => {
        if (armed !== at) return;
        if (leaving) return finish(null);
        finish(
          goodbye !== null
            ? ended(null, '')
            : {
                kind: 'timeout',
                code: null,
                message: liveSince === null ? `no Welcome within ${this.handshakeTimeoutMs} ms` : `no frame from the server for ${timeoutMs} ms`,
                goodbye: null,
                reconnectAfterMs: null,
              },
        );
      });
    };
    /** @param {number | null} code @param {string} details @returns {Lost} */
    const ended = (code, details) => {
      const name = code === null ? null : statusName(code);
      if (goodbye === null) return { kind: 'status', code: name, message: details, goodbye: null, reconnectAfterMs: null };
      return {
        kind: 'goodbye',
        code: name,
        message: goodbye.message,
        goodbye: typeof goodbye.reason === 'string' ? goodbye.reason : `GOODBYE_REASON_${goodbye.reason}`,
        reconnectAfterMs: goodbye.reconnectAfter ? durationMs(goodbye.reconnectAfter) : null,
      };
    };
    /** @param {any} request */
    const send = (request) => {
      if (!done && !leaving) call.write(request);
    };

    call.on('data', (/** @type {any} */ response) => {
      if (retiring) {
        // Only what keeps the old session alive until the server ends it.
        if (response.frame === 'ping') send({ pong: { seq: response.ping.seq } });
        return;
      }
      const now = performance.now();
      if (goodbye === null && !leaving) arm(liveSince === null ? this.handshakeTimeoutMs : timeoutMs, silence);
      switch (response.frame) {
        case 'welcome':
          if (liveSince === null) {
            const welcome = response.welcome;
            if (welcome.pingInterval) intervalMs = Math.min(Math.max(durationMs(welcome.pingInterval), MIN_INTERVAL_MS), MAX_INTERVAL_MS);
            const offered = welcome.timeout ? durationMs(welcome.timeout) : 0;
            // A timeout not longer than the interval would give up on the
            // server just as its next ping is due: take three intervals.
            timeoutMs = Math.min(offered > intervalMs ? offered : 3 * intervalMs, 3 * MAX_INTERVAL_MS);
            liveSince = now;
            arm(timeoutMs, silence);
            if (this.sendPings) {
              pinger = setInterval(() => {
                const at = performance.now();
                seq += 1;
                sent.set(seq, at);
                // Pings unanswered for a whole timeout will never be answered.
                for (const [old, when] of sent) if (at - when > timeoutMs) sent.delete(old);
                send({ ping: { seq } });
              }, intervalMs);
            }
            sessionId = welcome.sessionId;
            this.sessionId = welcome.sessionId;
            if (rotatedFrom === null) this.emit('connected', { sessionId: welcome.sessionId, pingIntervalMs: intervalMs, timeoutMs });
            else this.emit('rotated', { from: rotatedFrom, to: welcome.sessionId, pingIntervalMs: intervalMs, timeoutMs });
            settleLive();
          }
          break;
        case 'ping':
          send({ pong: { seq: response.ping.seq } });
          break;
        case 'pong': {
          const at = sent.get(response.pong.seq);
          if (at !== undefined) {
            sent.delete(response.pong.seq);
            const rttMs = now - at;
            this.rttMs = this.rttMs === null ? rttMs : this.rttMs + (rttMs - this.rttMs) / 8;
            this.emit('rtt', { seq: response.pong.seq, rttMs, smoothedMs: this.rttMs });
          }
          break;
        }
        case 'goodbye':
          if (response.goodbye.reason === 'GOODBYE_REASON_ROTATE' && liveSince !== null && !rotating && !leaving && !this.closing) {
            // Asked to rotate: the stream stays open for the grace, so this
            // is no end, and pings go on; a second ask is the end of the grace.
            rotating = true;
            settleRotate();
            break;
          }
          // The status follows at once; wait a little for it, and ping no more.
          goodbye = response.goodbye;
          clearInterval(pinger);
          if (!leaving) arm(Math.min(timeoutMs, this.closeTimeoutMs), silence);
          break;
      }
    });
    // Without this listener a non-OK status would end the process; the
    // status event below reports every ending.
    call.on('error', () => {});
    call.on('status', (/** @type {grpc.StatusObject} */ status) => finish(leaving || retiring ? null : ended(status.code, status.details)));

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
        // Also before Welcome: Hello may have reached the server, and frames
        // keep their order, so the server reads the goodbye after it.
        call.write({ goodbye: { reason: 'GOODBYE_REASON_CLIENT_SHUTDOWN' } });
        call.end();
        leaving = true;
        clearInterval(pinger);
        arm(this.closeTimeoutMs, () => finish(null));
      },
      retire: (goodbye) => {
        if (done) return;
        retiring = true;
        clearInterval(pinger);
        this.listening.delete(conversation);
        this.retiring.add(conversation);
        if (goodbye) {
          // Bounded by the close timeout; a goodbye a close already said
          // keeps its own bound.
          conversation.leave();
          return;
        }
        // The server ends the call at once (REPLACED, as the successor's
        // Hello arrived) or after the grace (ROTATED): one timeout is plenty.
        arm(timeoutMs, () => finish(null));
      },
      cancel: () => finish(null),
    };
    this.listening.add(conversation);
    call.write({ hello: this.hello });
    arm(this.handshakeTimeoutMs, silence);
    return conversation;
  }
}

/**
 * @typedef {{ type: 'opened' | 'suspected' | 'recovered', session: SessionView, revision: number }
 *   | { type: 'closed', session: SessionView, reason: string, message: string, revision: number }
 *   | { type: 'synced', epoch: number, revision: number }
 *   | { type: 'reset', revision: number }
 *   | { type: 'interrupted', code: string, message: string, retryInMs: number }} WatchEvent
 */

/** Statuses that asking again cannot fix. */
const FATAL = new Set([grpc.status.UNAUTHENTICATED, grpc.status.PERMISSION_DENIED, grpc.status.INVALID_ARGUMENT, grpc.status.UNIMPLEMENTED]);

/** The server refused a watch in a way that retrying cannot fix. */
class WatchFailed extends Error {
  /** @param {number} code @param {string} details */
  constructor(code, details) {
    super(`the presence watch was refused: ${statusName(code)}: ${details}`);
    this.code = statusName(code);
    this.details = details;
  }
}

/**
 * Follows `WatchSessions` and keeps `sessions` (a Map by session id) equal to
 * the server's view. When the stream breaks it asks again with the epoch and
 * the last revision it saw: the server replays what was missed, or sends
 * `reset` and a fresh snapshot. `for await (const event of watcher.events())`
 * runs it; each event is applied to `sessions` before it is yielded.
 */
class PresenceWatcher {
  /**
   * @param {string} target
   * @param {{ clientId?: string, labels?: Record<string, string>, credentials?: grpc.ChannelCredentials,
   *   adminToken?: string, backoff?: Backoff, services?: Services }} [options]
   */
  constructor(target, options = {}) {
    this.target = target;
    this.filter = { clientId: options.clientId ?? '', labels: { ...(options.labels ?? {}) } };
    this.credentials = options.credentials ?? grpc.credentials.createInsecure();
    this.metadata = bearer(options.adminToken);
    this.backoff = options.backoff ?? new Backoff();
    this.services = options.services ?? loadServices();
    new this.services.PresenceService(target, this.credentials).close();
    /** The open sessions by id. @type {Map<string, SessionView>} */
    this.sessions = new Map();
    /** The server's epoch, once synced (0 before). */
    this.epoch = 0;
    /** The revision of the last change applied. */
    this.revision = 0;
  }

  /**
   * The watch's events, forever; throws `WatchFailed` on a refusal that
   * retrying cannot fix.
   * @returns {AsyncGenerator<WatchEvent>}
   */
  async *events() {
    let attempt = 0;
    for (;;) {
      // Never synced: what comes is a whole snapshot again.
      if (this.epoch === 0) this.sessions.clear();
      const client = new this.services.PresenceService(this.target, this.credentials);
      const request = { ...this.filter, resumeEpoch: this.epoch, resumeAfter: this.revision };
      const call = /** @type {grpc.ClientReadableStream<any>} */ (/** @type {any} */ (client).WatchSessions(request, this.metadata));
      // The iteration below reports errors; this keeps one after it (from
      // the cancel in `finally`) from ending the process.
      call.on('error', () => {});
      /** @type {{ code: number, details: string }} */
      let end = { code: grpc.status.OK, details: 'the server ended the watch' };
      try {
        for await (const response of call) {
          const event = this.apply(response);
          if (event?.type === 'synced') attempt = 0;
          if (event) yield event;
        }
      } catch (error) {
        const failure = /** @type {grpc.ServiceError} */ (error);
        end = { code: failure.code, details: failure.details };
      } finally {
        call.cancel();
        client.close();
      }
      if (FATAL.has(end.code)) throw new WatchFailed(end.code, end.details);
      attempt += 1;
      const retryInMs = this.backoff.delayMs(attempt);
      yield { type: 'interrupted', code: statusName(end.code), message: end.details, retryInMs };
      await new Promise((resolve) => setTimeout(resolve, retryInMs));
    }
  }

  /**
   * @param {any} response
   * @returns {WatchEvent | null}
   */
  apply(response) {
    const revision = response.revision;
    this.revision = revision;
    switch (response.event) {
      case 'opened':
        this.sessions.set(response.opened.sessionId, response.opened);
        return { type: 'opened', session: response.opened, revision };
      case 'closed': {
        const { session, reason, message } = response.closed;
        this.sessions.delete(session.sessionId);
        return { type: 'closed', session, reason: String(reason), message, revision };
      }
      case 'suspected':
      case 'recovered': {
        const session = response[response.event].session;
        this.sessions.set(session.sessionId, session);
        return { type: response.event, session, revision };
      }
      case 'synced':
        this.epoch = response.synced.epoch;
        return { type: 'synced', epoch: this.epoch, revision };
      case 'reset':
        // Until the snapshot that follows is synced, this watcher has no
        // view to resume from: a break before `synced` asks afresh.
        this.sessions.clear();
        this.epoch = 0;
        return { type: 'reset', revision };
      default:
        // An event newer than this client: its revision counts, nothing else.
        return null;
    }
  }
}

module.exports = { Backoff, LOADER_OPTIONS, PresenceWatcher, Session, WatchFailed, bearer, durationMs, loadServices, statusName };

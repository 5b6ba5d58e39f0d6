package tidemark.pubsub;

import java.io.IOException;
import java.util.Collections;
import java.util.List;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient;

/**
 * A PubsubClient whose pulls rest briefly after one that brought only a trickle, so that a reader
 * that has caught up does not pull without pause.
 *
 * <p>Beam's Pub/Sub reader (2.62.0) pulls, returning immediately, whenever it has nothing left to
 * read, and Flink's source loop asks every reader of a subtask in turn, resting only after a round
 * in which none of them had anything: with live traffic one of them nearly always has, so every
 * reader pulls again at once, each pull bringing a handful of messages or none. Beam splits a
 * subscription into several readers per subtask, and those pulls (each a request to the service,
 * each to be parsed) cost the service and the TaskManager more than the messages do.
 *
 * <p>Here a pull that brought fewer than {@link #TRICKLE} messages makes this client answer the
 * reader's next pulls within {@link #PAUSE_MS} with nothing, without asking the service: the reader
 * reports no new message, as for an empty pull, and Flink's loop moves on. A pull that brought
 * more is followed by the next at once, so a backlog is still pulled batch after batch (a service
 * may return fewer messages than asked while more are waiting: the emulator returns at most 100).
 * A message published to a subscription read dry waits at most {@link #PAUSE_MS} longer.
 */
final class PacedPullClient extends ForwardingPubsubClient {
  /** A pull that brings fewer messages than this is a trickle: the next one rests. */
  static final int TRICKLE = 50;

  /** How long a reader's pulls rest after a trickle. */
  static final long PAUSE_MS = 100;

  /** Until when (epoch ms) the next pull answers nothing. */
  private long restUntilMs;

  PacedPullClient(PubsubClient delegate) {
    super(delegate);
  }

  @Override
  public List<IncomingMessage> pull(
      long requestTimeMsSinceEpoch,
      SubscriptionPath subscription,
      int batchSize,
      boolean returnImmediately)
      throws IOException {
    long now = System.currentTimeMillis();
    if (now < restUntilMs) {
      return Collections.emptyList();
    }
    List<IncomingMessage> pulled =
        delegate.pull(requestTimeMsSinceEpoch, subscription, batchSize, returnImmediately);
    restUntilMs = pulled.size() < Math.min(TRICKLE, batchSize) ? now + PAUSE_MS : 0;
    return pulled;
  }
}

package tidemark.pubsub;

import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient.PubsubClientFactory;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubJsonClient;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubOptions;
import org.apache.beam.sdk.transforms.windowing.BoundedWindow;
import org.checkerframework.checker.nullness.qual.Nullable;

/**
 * Pub/Sub's JSON client that stamps each message with the event time of a timestamp attribute
 * for the reader's watermark, without ever failing a pull on it.
 *
 * <p>Beam's own client raises on a message whose timestamp attribute is missing or is not epoch
 * milliseconds or RFC 3339; inside the unbounded source that fails the pull, the task restarts,
 * the message is delivered again and fails it again: one bad message stops the job.
 *
 * <p>Beam's reader estimates its watermark as the lowest timestamp it read in the last minute,
 * so one straggler (an event long behind the others) would hold the watermark at its own event
 * time for a minute, and a straggler every minute would hold it for good. Here each message is
 * stamped with the highest event time this client has read so far, its own included: a
 * straggler, or a message without a usable attribute, takes the stamp of the newest event
 * before it (its publish time before any event time), so it neither stops the job nor holds
 * the watermark back; downstream, the payload decides its window and whether it is too late.
 *
 * <p>Its pulls are paced ({@link PacedPullClient}): a reader whose pull brought only a trickle
 * rests a moment before it asks again.
 */
public final class EventTimeClientFactory implements PubsubClientFactory {
  private static final long serialVersionUID = 1L;

  private final String timestampAttribute;

  public EventTimeClientFactory(String timestampAttribute) {
    if (timestampAttribute == null || timestampAttribute.isEmpty()) {
      throw new IllegalArgumentException("timestampAttribute must be set");
    }
    this.timestampAttribute = timestampAttribute;
  }

  @Override
  public PubsubClient newClient(
      @Nullable String ignoredTimestampAttribute,
      @Nullable String idAttribute,
      PubsubOptions options,
      @Nullable String rootUrlOverride)
      throws IOException {
    return new EventTimeClient(
        new PacedPullClient(
            PubsubJsonClient.FACTORY.newClient(null, idAttribute, options, rootUrlOverride)),
        timestampAttribute);
  }

  @Override
  public PubsubClient newClient(
      @Nullable String ignoredTimestampAttribute, @Nullable String idAttribute, PubsubOptions options)
      throws IOException {
    return newClient(ignoredTimestampAttribute, idAttribute, options, null);
  }

  @Override
  public String getKind() {
    return "Json (event time from attribute '" + timestampAttribute + "')";
  }

  /**
   * The event time in {@code value} (epoch milliseconds or RFC 3339) within Beam's timestamp
   * range, or null.
   */
  static @Nullable Long eventTime(@Nullable String value) {
    if (value == null || value.isEmpty()) {
      return null;
    }
    long millis;
    try {
      millis = Long.parseLong(value);
    } catch (NumberFormatException notMillis) {
      try {
        millis = com.google.api.client.util.DateTime.parseRfc3339(value).getValue();
      } catch (RuntimeException notRfc3339) {
        return null;
      }
    }
    if (millis <= BoundedWindow.TIMESTAMP_MIN_VALUE.getMillis()
        || millis >= BoundedWindow.TIMESTAMP_MAX_VALUE.getMillis()) {
      return null;
    }
    return millis;
  }

  /** Restamps what the delegate pulls; everything else is the delegate's. */
  static final class EventTimeClient extends ForwardingPubsubClient {
    private final String timestampAttribute;
    /** The highest event time read so far. */
    private @Nullable Long highWater;

    EventTimeClient(PubsubClient delegate, String timestampAttribute) {
      super(delegate);
      this.timestampAttribute = timestampAttribute;
    }

    @Override
    public List<IncomingMessage> pull(
        long requestTimeMsSinceEpoch,
        SubscriptionPath subscription,
        int batchSize,
        boolean returnImmediately)
        throws IOException {
      List<IncomingMessage> pulled =
          delegate.pull(requestTimeMsSinceEpoch, subscription, batchSize, returnImmediately);
      List<IncomingMessage> stamped = new ArrayList<>(pulled.size());
      for (IncomingMessage message : pulled) {
        Long eventTime =
            eventTime(message.message().getAttributesMap().get(timestampAttribute));
        if (eventTime != null && (highWater == null || eventTime > highWater)) {
          highWater = eventTime;
        }
        stamped.add(
            IncomingMessage.of(
                message.message(),
                highWater != null ? highWater : message.timestampMsSinceEpoch(),
                message.requestTimeMsSinceEpoch(),
                message.ackId(),
                message.recordId()));
      }
      return stamped;
    }
  }
}

package tidemark.pubsub;

import java.io.IOException;
import java.util.ArrayList;
import java.util.List;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient.PubsubClientFactory;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubJsonClient;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubOptions;
import org.checkerframework.checker.nullness.qual.Nullable;

/**
 * Pub/Sub's JSON client whose messages carry the event time of a timestamp attribute, and
 * whose pulls never fail on it.
 *
 * <p>Beam's own client raises on a message whose timestamp attribute is missing or is not epoch
 * milliseconds or RFC 3339; inside the unbounded source that fails the pull, the task restarts,
 * the message is delivered again and fails it again: one bad message stops the job. Here such a
 * message takes the latest event time this client has read (its publish time before any), so
 * it neither stops the job nor moves the watermark; the payload decides its window downstream.
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
        PubsubJsonClient.FACTORY.newClient(null, idAttribute, options, rootUrlOverride),
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

  /** The event time in {@code value} (epoch milliseconds or RFC 3339), or null. */
  static @Nullable Long eventTime(@Nullable String value) {
    if (value == null || value.isEmpty()) {
      return null;
    }
    try {
      return Long.parseLong(value);
    } catch (NumberFormatException notMillis) {
      try {
        return com.google.api.client.util.DateTime.parseRfc3339(value).getValue();
      } catch (RuntimeException notRfc3339) {
        return null;
      }
    }
  }

  /** Restamps what the delegate pulls; everything else is the delegate's. */
  static final class EventTimeClient extends ForwardingPubsubClient {
    private final String timestampAttribute;
    private @Nullable Long latestEventTime;

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
        if (eventTime != null) {
          latestEventTime = eventTime;
        } else {
          eventTime =
              latestEventTime != null ? latestEventTime : message.timestampMsSinceEpoch();
        }
        stamped.add(
            IncomingMessage.of(
                message.message(),
                eventTime,
                message.requestTimeMsSinceEpoch(),
                message.ackId(),
                message.recordId()));
      }
      return stamped;
    }
  }
}

package tidemark.pubsub;

import java.util.Map;
import org.apache.beam.sdk.expansion.ExternalTransformRegistrar;
import org.apache.beam.sdk.io.Read;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubUnboundedSource;
import org.apache.beam.sdk.options.ValueProvider.StaticValueProvider;
import org.apache.beam.sdk.transforms.ExternalTransformBuilder;
import org.apache.beam.sdk.transforms.PTransform;
import org.apache.beam.sdk.values.PBegin;
import org.apache.beam.sdk.values.PCollection;
import org.apache.beam.vendor.guava.v32_1_2_jre.com.google.common.collect.ImmutableMap;
import org.checkerframework.checker.nullness.qual.Nullable;
import org.joda.time.Duration;

/**
 * Tidemark's Pub/Sub read for other SDKs: one subscription read with Beam's PubsubIO, each
 * message (payload, attributes, message id) as the bytes of its {@code google.pubsub.v1}
 * proto, stamped with the event time of its timestamp attribute by {@link
 * EventTimeClientFactory}, so the watermark follows event time, a configured delay behind the
 * newest stamp read ({@link RecentEventTimeSource}).
 */
public final class ReadEventsRegistrar implements ExternalTransformRegistrar {
  public static final String URN = "beam:transform:tidemark:pubsub_read_events:v1";

  @Override
  public Map<String, Class<? extends ExternalTransformBuilder<?, ?, ?>>> knownBuilders() {
    return ImmutableMap.of(URN, Builder.class);
  }

  /** The read's parameters, set from the expansion request's fields. */
  public static class Configuration {
    private @Nullable String subscription;
    private @Nullable String timestampAttribute;
    private @Nullable Long watermarkDelayMs;
    private @Nullable Long maxNumRecords;

    public void setSubscription(String subscription) {
      this.subscription = subscription;
    }

    public void setTimestampAttribute(String timestampAttribute) {
      this.timestampAttribute = timestampAttribute;
    }

    public void setWatermarkDelayMs(Long watermarkDelayMs) {
      this.watermarkDelayMs = watermarkDelayMs;
    }

    public void setMaxNumRecords(Long maxNumRecords) {
      this.maxNumRecords = maxNumRecords;
    }
  }

  /** Builds the read from its configuration. */
  public static class Builder
      implements ExternalTransformBuilder<Configuration, PBegin, PCollection<byte[]>> {
    @Override
    public PTransform<PBegin, PCollection<byte[]>> buildExternal(Configuration config) {
      if (config.subscription == null
          || config.timestampAttribute == null
          || config.watermarkDelayMs == null) {
        throw new IllegalArgumentException(
            "subscription, timestamp_attribute and watermark_delay_ms must be set");
      }
      if (config.maxNumRecords != null && config.maxNumRecords <= 0) {
        throw new IllegalArgumentException(
            "max_num_records must be positive, got " + config.maxNumRecords);
      }
      return new ReadEvents(
          config.subscription,
          config.timestampAttribute,
          Duration.millis(config.watermarkDelayMs),
          config.maxNumRecords);
    }
  }

  /**
   * The read itself: unbounded, or with {@code maxNumRecords} a bounded read of that many
   * messages (Beam's {@code BoundedReadFromUnboundedSource}: the messages are acknowledged when
   * the read ends, redeliveries dropped by message id).
   */
  static final class ReadEvents extends PTransform<PBegin, PCollection<byte[]>> {
    private final String subscription;
    private final String timestampAttribute;
    private final Duration watermarkDelay;
    private final @Nullable Long maxNumRecords;

    ReadEvents(
        String subscription,
        String timestampAttribute,
        Duration watermarkDelay,
        @Nullable Long maxNumRecords) {
      this.subscription = subscription;
      this.timestampAttribute = timestampAttribute;
      this.watermarkDelay = watermarkDelay;
      this.maxNumRecords = maxNumRecords;
    }

    @Override
    public PCollection<byte[]> expand(PBegin input) {
      // What PubsubIO.readMessagesWithAttributesAndMessageId() reads (its reader's bytes are
      // then the message's proto, message id included), behind Tidemark's watermark.
      PubsubUnboundedSource read =
          new PubsubUnboundedSource(
              new EventTimeClientFactory(timestampAttribute),
              null,
              null,
              StaticValueProvider.of(PubsubClient.subscriptionPathFromPath(subscription)),
              null,
              null,
              true,
              true);
      Read.Unbounded<byte[]> unbounded = Read.from(RecentEventTimeSource.of(read, watermarkDelay));
      if (maxNumRecords != null) {
        return input.apply("Read", unbounded.withMaxNumRecords(maxNumRecords));
      }
      return input.apply("Read", unbounded);
    }
  }
}

package tidemark.pubsub;

import java.util.Map;
import org.apache.beam.sdk.expansion.ExternalTransformRegistrar;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubIO;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubMessages;
import org.apache.beam.sdk.transforms.ExternalTransformBuilder;
import org.apache.beam.sdk.transforms.MapElements;
import org.apache.beam.sdk.transforms.PTransform;
import org.apache.beam.sdk.values.PBegin;
import org.apache.beam.sdk.values.PCollection;
import org.apache.beam.sdk.values.TypeDescriptor;
import org.apache.beam.vendor.guava.v32_1_2_jre.com.google.common.collect.ImmutableMap;
import org.checkerframework.checker.nullness.qual.Nullable;

/**
 * Tidemark's Pub/Sub read for other SDKs: one subscription read with Beam's PubsubIO, each
 * message (payload, attributes, message id) as the bytes of its {@code google.pubsub.v1}
 * proto, stamped with the event time of its timestamp attribute by {@link
 * EventTimeClientFactory}, so the watermark follows event time.
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

    public void setSubscription(String subscription) {
      this.subscription = subscription;
    }

    public void setTimestampAttribute(String timestampAttribute) {
      this.timestampAttribute = timestampAttribute;
    }
  }

  /** Builds the read from its configuration. */
  public static class Builder
      implements ExternalTransformBuilder<Configuration, PBegin, PCollection<byte[]>> {
    @Override
    public PTransform<PBegin, PCollection<byte[]>> buildExternal(Configuration config) {
      if (config.subscription == null || config.timestampAttribute == null) {
        throw new IllegalArgumentException("subscription and timestamp_attribute must be set");
      }
      return new ReadEvents(config.subscription, config.timestampAttribute);
    }
  }

  /** The read itself. */
  static final class ReadEvents extends PTransform<PBegin, PCollection<byte[]>> {
    private final String subscription;
    private final String timestampAttribute;

    ReadEvents(String subscription, String timestampAttribute) {
      this.subscription = subscription;
      this.timestampAttribute = timestampAttribute;
    }

    @Override
    public PCollection<byte[]> expand(PBegin input) {
      return input
          .apply(
              "Read",
              PubsubIO.readMessagesWithAttributesAndMessageId()
                  .fromSubscription(subscription)
                  .withClientFactory(new EventTimeClientFactory(timestampAttribute)))
          .apply(
              "ToProtoBytes",
              MapElements.into(TypeDescriptor.of(byte[].class))
                  .via(new PubsubMessages.ParsePayloadAsPubsubMessageProto()));
    }
  }
}

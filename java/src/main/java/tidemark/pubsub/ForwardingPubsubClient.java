package tidemark.pubsub;

import com.google.pubsub.v1.Schema.Type;
import java.io.IOException;
import java.util.List;
import org.apache.beam.sdk.io.gcp.pubsub.PubsubClient;
import org.apache.beam.sdk.schemas.Schema;

/** A PubsubClient that hands every call to another one. */
abstract class ForwardingPubsubClient extends PubsubClient {
  protected final PubsubClient delegate;

  ForwardingPubsubClient(PubsubClient delegate) {
    this.delegate = delegate;
  }

  @Override
  public void close() throws IOException {
    delegate.close();
  }

  @Override
  public int publish(TopicPath topic, List<OutgoingMessage> outgoingMessages) throws IOException {
    return delegate.publish(topic, outgoingMessages);
  }

  @Override
  public List<IncomingMessage> pull(
      long requestTimeMsSinceEpoch,
      SubscriptionPath subscription,
      int batchSize,
      boolean returnImmediately)
      throws IOException {
    return delegate.pull(requestTimeMsSinceEpoch, subscription, batchSize, returnImmediately);
  }

  @Override
  public void acknowledge(SubscriptionPath subscription, List<String> ackIds) throws IOException {
    delegate.acknowledge(subscription, ackIds);
  }

  @Override
  public void modifyAckDeadline(
      SubscriptionPath subscription, List<String> ackIds, int deadlineSeconds) throws IOException {
    delegate.modifyAckDeadline(subscription, ackIds, deadlineSeconds);
  }

  @Override
  public void createTopic(TopicPath topic) throws IOException {
    delegate.createTopic(topic);
  }

  @Override
  public void createTopic(TopicPath topic, SchemaPath schema) throws IOException {
    delegate.createTopic(topic, schema);
  }

  @Override
  public void deleteTopic(TopicPath topic) throws IOException {
    delegate.deleteTopic(topic);
  }

  @Override
  public List<TopicPath> listTopics(ProjectPath project) throws IOException {
    return delegate.listTopics(project);
  }

  @Override
  public boolean isTopicExists(TopicPath topic) throws IOException {
    return delegate.isTopicExists(topic);
  }

  @Override
  public void createSubscription(
      TopicPath topic, SubscriptionPath subscription, int ackDeadlineSeconds) throws IOException {
    delegate.createSubscription(topic, subscription, ackDeadlineSeconds);
  }

  @Override
  public void deleteSubscription(SubscriptionPath subscription) throws IOException {
    delegate.deleteSubscription(subscription);
  }

  @Override
  public List<SubscriptionPath> listSubscriptions(ProjectPath project, TopicPath topic)
      throws IOException {
    return delegate.listSubscriptions(project, topic);
  }

  @Override
  public int ackDeadlineSeconds(SubscriptionPath subscription) throws IOException {
    return delegate.ackDeadlineSeconds(subscription);
  }

  @Override
  public boolean isEOF() {
    return delegate.isEOF();
  }

  @Override
  public void createSchema(SchemaPath schemaPath, String schemaContent, Type type)
      throws IOException {
    delegate.createSchema(schemaPath, schemaContent, type);
  }

  @Override
  public void deleteSchema(SchemaPath schemaPath) throws IOException {
    delegate.deleteSchema(schemaPath);
  }

  @Override
  public SchemaPath getSchemaPath(TopicPath topicPath) throws IOException {
    return delegate.getSchemaPath(topicPath);
  }

  @Override
  public Schema getSchema(SchemaPath schemaPath) throws IOException {
    return delegate.getSchema(schemaPath);
  }
}

// ChatView.swift: a minimal SwiftUI screen on top of the generated MLXKitBundle.swift.
// A sketch for the README in this folder: not compiled here (no iOS toolchain). Uses
// mlx-swift-lm 3.x: ModelContainer.perform, UserInput, generate(input:parameters:context:).

import MLXHuggingFace
import MLXLLM
import MLXLMCommon
import SwiftUI

@MainActor
@Observable
final class ChatModel {
    var status = "Not loaded"
    var reply = ""
    private var loaded: MLXKitLoaded?

    func load() async {
        guard let url = MLXKitBundle.locate() else {
            status = "The model has not been downloaded yet."
            return
        }
        do {
            loaded = try await MLXKitBundle.load(from: url, using: #huggingFaceTokenizerLoader())
            if let check = loaded?.check, !check.deviceListed {
                status = "Loaded (this device, \(check.deviceModel), was not in the plan)"
            } else {
                status = "Loaded"
            }
        } catch {
            status = error.localizedDescription
        }
    }

    func send(_ prompt: String) async {
        guard let loaded else { return }
        reply = ""
        do {
            let stream = try await loaded.container.perform { context in
                let input = try await context.processor.prepare(
                    input: UserInput(chat: [.user(prompt)]))
                var parameters = loaded.parameters
                // stay within the context the memory plan was made for
                parameters.maxTokens = loaded.maxNewTokens(promptTokens: input.text.tokens.size)
                return try MLXLMCommon.generate(
                    input: input, parameters: parameters, context: context)
            }
            for await event in stream {
                if let chunk = event.chunk {
                    reply += chunk
                }
            }
        } catch {
            status = error.localizedDescription
        }
    }
}

struct ChatView: View {
    @State private var model = ChatModel()
    @State private var prompt = ""

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Text(model.status).font(.caption)
            ScrollView { Text(model.reply).frame(maxWidth: .infinity, alignment: .leading) }
            HStack {
                TextField("Ask something", text: $prompt)
                Button("Send") { Task { await model.send(prompt) } }
            }
        }
        .padding()
        .task { await model.load() }
    }
}
